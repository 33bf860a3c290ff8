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

from secateur.cli.options import job_spec
from secateur.cli.outcome import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_GATE,
    EXIT_OK,
    exit_code_for_job,
)
from secateur.cli.progress import ProgressDisplay
from secateur.cli.render import format_table
from secateur.cli.signals import StopOnSignals, sigterm_as_interrupt
from secateur.cli.verbosity import route_output


def start_tensorflow(verbosity: int) -> None:
    """Import TensorFlow for a local command, its start-up lines shown only with ``-v``.

    See :mod:`secateur.cli.verbosity`: quiet, stderr is closed while TensorFlow
    imports, because the lines absl writes before its logging starts ignore
    TF_CPP_MIN_LOG_LEVEL.

    Raises:
        ModuleNotFoundError: TensorFlow is not installed.
    """
    # Must be set before TensorFlow starts: it makes the CPU allocator report
    # peak memory, which the measurement stage needs.
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    route_output(verbosity)
    quiet = "tensorflow" not in sys.modules and os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "3"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            if quiet:
                os.dup2(null.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def build_request(args: argparse.Namespace) -> Any:
    """The pipeline's JobRequest: the JobSpec ``submit`` would send, converted
    and checked by the server's own conversion (no TensorFlow).

    Raises:
        ValueError: a flag or spec-file value of the wrong type.
        ServiceError: INVALID_ARGUMENT naming the field (``spec.pruning.ratio``).
    """
    from secateur.server.pipeline.convert import job_request

    return job_request(job_spec(args))


def cmd_prune(args: argparse.Namespace) -> int:
    start_tensorflow(args.verbose)
    from secateur.pruner.errors import CancelledError, SecateurError
    from secateur.server.errors import ServiceError
    from secateur.server.pipeline.prune_job import GateFailed, PruneJob
    from secateur.server.pipeline.target_job import default_profile_dir
    from secateur.server.storage import Storage, StorageError

    bar = ProgressDisplay()
    stop = StopOnSignals()
    try:
        request = build_request(args)
        member = _join_cluster()
        trusted = trust_packages(args.trust_package)
        storage = Storage(args.allowed_uri_prefix or None)
        with stop.installed():
            report = PruneJob(
                request, storage, on_event=bar, should_cancel=stop, trusted=trusted,
                profile_dir=default_profile_dir(),
            ).run()  # fmt: skip
        code = EXIT_OK
    except GateFailed as gate:
        report, code = gate.report, EXIT_GATE
    except ServiceError as exc:  # the request itself: the same check a server makes
        bar.close()
        print(f"secateur: error: {exc.message}", file=sys.stderr)
        for field, description in exc.violations:
            if description != exc.message:
                print(f"  {field}: {description}", file=sys.stderr)
        return EXIT_BAD_INPUT
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
    if report.get("role") == "member":  # a multi-host member that is not the chief
        print(
            f"secateur: {member.task_type} {member.task_index} of a {member.members}-member "
            "cluster: trained; the chief evaluates and publishes, this member wrote nothing",
            file=sys.stderr,
        )
        return EXIT_OK
    if stop():
        print(f"secateur: {stop.what()}came after publishing; the version stands", file=sys.stderr)
    print(format_table(report))
    if args.report:
        _write_report(report, args.report)
    if code == EXIT_GATE:
        print(f"secateur: accuracy gate failed: {report.get('decision')}", file=sys.stderr)
    return code


def trust_packages(names: Sequence[str] | None) -> tuple[str, ...]:
    """``--trust-package``: each one imported now, so a missing one fails before any work.

    Raises:
        ValueError: a package that is not installed or does not import.
    """
    from secateur.pruner.safety import trusted_objects

    trusted = tuple(names or ())
    trusted_objects(trusted)  # imports them: their classes register themselves
    return trusted


def _join_cluster() -> Any:
    """This process's place in a multi-host job (TF_CONFIG / a TPU slice), or None.

    The cluster's strategy is made here, before any other TensorFlow op: collective
    ops can only be configured while TensorFlow's context is not yet started.
    """
    from secateur.pruner.cluster import start_cluster

    return start_cluster()


def _write_report(report: dict[str, Any], path: str) -> None:
    """The JSON report at ``path``; for a sweep, its curves beside it."""
    from secateur.server.pipeline.report import write_curves

    with open(path, "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    if len(report["candidates"]) > 1:
        stem = os.path.splitext(path)[0]
        for curve in write_curves(report, stem):
            print(f"curve: {curve}")


def cmd_demo(args: argparse.Namespace) -> int:
    start_tensorflow(args.verbose)
    import tempfile

    from secateur.cli.demo import DemoConfig, run_demo
    from secateur.client.protospec import report_from_job

    workdir = args.workdir or tempfile.mkdtemp(prefix="secateur-demo-")
    cfg = DemoConfig(workdir=workdir, ratios=args.ratios, finetune_epochs=args.epochs)
    pretrain, bar = ProgressDisplay(), ProgressDisplay()

    def on_update(job: Any) -> None:
        pretrain.close()
        bar.job(job)

    try:
        with sigterm_as_interrupt():
            job = run_demo(
                cfg,
                on_update=on_update,
                log=lambda m: print(m, file=sys.stderr),
                on_pretrain=lambda frac, what: pretrain.update("PRE-TRAINING", frac, what),
            )
    except KeyboardInterrupt:
        # Leaving run_demo stopped its in-process service, and with it the job's worker.
        pretrain.close()
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


def run_worker(argv: Sequence[str]) -> int:
    """``secateur worker ...``: the server owns its flags (and its ``--help``)."""
    from secateur.server.main import worker_main

    return int(worker_main(list(argv)))
