"""Subcommands that run in this process: ``prune``, ``demo``, and ``serve``'s hand-over.

They import the pruner and the server, inside the functions only, so that
``secateur --help`` and the remote subcommands never load TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from secateur.cli.options import DATA_FIELDS, SPEC_FIELDS, TRAIN_FIELDS, merged_options
from secateur.cli.outcome import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_GATE,
    EXIT_OK,
    exit_code_for_job,
)
from secateur.cli.render import ProgressBar, format_table
from secateur.cli.signals import StopOnSignals, sigterm_as_interrupt


def _quiet_tensorflow() -> None:
    # Must be set before TensorFlow starts: it makes the CPU allocator report
    # peak memory, which the measurement stage needs.
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_request(args: argparse.Namespace) -> Any:
    """The pipeline's JobRequest from parsed arguments (imports the pruner)."""
    from secateur.pruner.data import DataSpec
    from secateur.pruner.finetune import TrainConfig
    from secateur.pruner.measure import MeasureConfig
    from secateur.pruner.spec import PruneSpec
    from secateur.server.pipeline import JobRequest

    opts = merged_options(args)
    spec = PruneSpec.from_dict({k: opts[k] for k in SPEC_FIELDS if k in opts})
    train = TrainConfig(**{k: opts[k] for k in TRAIN_FIELDS if k in opts})
    data = DataSpec(**{k: opts[k] for k in DATA_FIELDS if k in opts})
    measure = (
        MeasureConfig(steps=opts["measure_steps"]) if opts.get("measure_steps") else MeasureConfig()
    )
    return JobRequest(
        model_uri=args.model_uri,
        output_uri=args.output_uri,
        spec=spec,
        ratios=tuple(opts.get("ratios") or ()),
        train=train,
        train_data=opts.get("train_data"),
        eval_data=opts.get("eval_data"),
        data=data,
        max_accuracy_drop=opts.get("max_accuracy_drop"),
        measure=measure,
        version=opts.get("version"),
    )


def cmd_prune(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    from secateur.pruner.errors import CancelledError, SecateurError
    from secateur.server.pipeline import GateFailed, PruneJob
    from secateur.server.storage import Storage, StorageError

    bar = ProgressBar()
    stop = StopOnSignals()
    try:
        request = build_request(args)
        storage = Storage(args.allowed_uri_prefix or None)
        with stop.installed():
            report = PruneJob(request, storage, on_event=bar, should_cancel=stop).run()
        code = EXIT_OK
    except GateFailed as gate:
        report, code = gate.report, EXIT_GATE
    except (SecateurError, StorageError, ValueError, OSError) as exc:
        bar.close()
        if isinstance(exc, CancelledError):
            print(
                f"secateur: {stop.what()}cancelled: {exc}; nothing was published", file=sys.stderr
            )
            return EXIT_CANCELLED
        print(f"secateur: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        bar.close()
        print(f"secateur: {stop.what()}cancelled; nothing was published", file=sys.stderr)
        return EXIT_CANCELLED
    bar.close()
    if stop():
        print(f"secateur: {stop.what()}came after publishing; the version stands", file=sys.stderr)
    print(format_table(report))
    if args.report:
        _write_report(report, args.report)
    if code == EXIT_GATE:
        print(f"secateur: accuracy gate failed: {report.get('decision')}", file=sys.stderr)
    return code


def _write_report(report: dict[str, Any], path: str) -> None:
    """The JSON report at ``path``; for a sweep, its curves beside it."""
    from secateur.server.pipeline import write_curves

    with open(path, "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    if len(report["candidates"]) > 1:
        stem = os.path.splitext(path)[0]
        for curve in write_curves(report, stem):
            print(f"curve: {curve}")


def cmd_demo(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    import tempfile

    from secateur.cli.demo import DemoConfig, run_demo
    from secateur.client.protospec import report_from_job

    workdir = args.workdir or tempfile.mkdtemp(prefix="secateur-demo-")
    cfg = DemoConfig(workdir=workdir, ratios=args.ratios, finetune_epochs=args.epochs)
    bar = ProgressBar()
    try:
        with sigterm_as_interrupt():
            job = run_demo(cfg, on_update=bar.job, log=lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        # Leaving run_demo stopped its in-process service, and with it the job's worker.
        bar.close()
        print("secateur: demo interrupted; its job was stopped, nothing published", file=sys.stderr)
        print(f"work directory: {workdir}")
        return EXIT_CANCELLED
    bar.close()
    if job.result.HasField("original"):
        print(format_table(report_from_job(job)))
    else:
        print(f"job {job.name} ended {job.error.message}", file=sys.stderr)
    print(f"work directory: {workdir}")
    return exit_code_for_job(job)


def run_serve(argv: Sequence[str]) -> int:
    """``secateur serve ...``: the server owns its flags (and its ``--help``)."""
    from secateur.server.main import main as serve_main

    return int(serve_main(list(argv)))
