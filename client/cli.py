"""The ``secateur`` command line.

Subcommands load heavy modules only when they run, so ``secateur --help``
and the client never import TensorFlow.

Exit codes (stable; CI stages gate on them):

====  =========================================================
0     success
1     unexpected internal error (traceback printed)
2     bad input: invalid spec, model or data; URI not found, not
      allowed or unreachable; output version already exists
3     accuracy gate failed: no candidate within --max-accuracy-drop
4     cancelled (Ctrl-C / SIGTERM)
====  =========================================================
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_GATE, EXIT_CANCELLED = 0, 1, 2, 3, 4


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ratios must be numbers separated by commas: {text!r}"
        ) from None


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``prune`` and (later) ``submit``; defaults live in the spec."""
    g = p.add_argument_group("pruning spec (flags override --spec)")
    g.add_argument("--spec", help="YAML or JSON file with any of the fields below")
    g.add_argument("--ratio", type=float, help="fraction of prunable channels to remove [0, 1)")
    g.add_argument(
        "--ratios", type=_ratios, help="sweep: comma-separated ratios, one candidate each"
    )
    g.add_argument("--criterion", choices=["bn_scale", "l1", "l2", "random"])
    g.add_argument("--scope", choices=["global", "layerwise"])
    g.add_argument("--round-to", type=int, dest="round_to")
    g.add_argument("--min-channels", type=int, dest="min_channels")
    g.add_argument("--exclude", action="append", help="layer name to leave whole (repeatable)")
    g.add_argument(
        "--no-reload",
        action="store_false",
        dest="reload_weights",
        default=None,
        help="fresh initialisation instead of the original weights",
    )
    g.add_argument("--seed", type=int)
    t = p.add_argument_group("fine-tuning and data")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, dest="batch_size")
    t.add_argument("--learning-rate", type=float, dest="learning_rate")
    t.add_argument("--train-data", dest="train_data", help="TFRecord path, glob or gs:// pattern")
    t.add_argument("--eval-data", dest="eval_data", help="TFRecord path, glob or gs:// pattern")
    t.add_argument("--image-key", dest="image_key")
    t.add_argument("--label-key", dest="label_key")
    t.add_argument(
        "--resize", action="store_true", default=None, help="resize images to the model input"
    )
    t.add_argument(
        "--max-accuracy-drop",
        type=float,
        dest="max_accuracy_drop",
        help="publish the largest ratio whose accuracy drop is within this (0.02 = 2 points)",
    )
    t.add_argument("--measure-steps", type=int, dest="measure_steps", help="timed steps per round")


SPEC_FIELDS = (
    "ratio",
    "criterion",
    "scope",
    "round_to",
    "min_channels",
    "exclude",
    "reload_weights",
    "seed",
)
TRAIN_FIELDS = ("epochs", "batch_size", "learning_rate")
DATA_FIELDS = ("image_key", "label_key", "resize")
JOB_FIELDS = ("ratios", "train_data", "eval_data", "max_accuracy_drop", "measure_steps", "version")


def load_spec_file(path: str) -> dict[str, Any]:
    """Read a YAML/JSON spec file into a flat dict of known fields."""
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(
            f"spec file must hold a mapping. Received: {type(data).__name__} in {path}"
        )
    known = set(SPEC_FIELDS + TRAIN_FIELDS + DATA_FIELDS + JOB_FIELDS)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown field(s) in {path}; known: {sorted(known)}. Received: {unknown}")
    if "ratios" in data and isinstance(data["ratios"], str):
        data["ratios"] = _ratios(data["ratios"])
    return data


def merged_options(args: argparse.Namespace) -> dict[str, Any]:
    """Spec file values overridden by flags that were given."""
    values = load_spec_file(args.spec) if args.spec else {}
    for name in SPEC_FIELDS + TRAIN_FIELDS + DATA_FIELDS + JOB_FIELDS:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    return values


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


class ProgressBar:
    """A one-line progress display on stderr (plain lines when not a TTY)."""

    def __init__(self, stream: Any = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.width = width
        self.last_stage = ""

    def __call__(self, event: Any) -> None:
        from secateur.server.pipeline import STAGES

        idx = STAGES.index(event.stage) if event.stage in STAGES else 0
        filled = int(self.width * (idx + min(max(event.progress, 0.0), 1.0)) / len(STAGES))
        bar = "#" * filled + "-" * (self.width - filled)
        detail = event.detail
        extra = ""
        if "step" in detail:
            loss = detail.get("loss")
            extra = f" epoch {detail['epoch']}/{detail['epochs']} step {detail['step']}"
            extra += f" loss {loss:.3f}" if loss is not None else ""
        line = f"[{bar}] {event.stage:<11} {event.message}{extra}"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
        elif event.stage != self.last_stage or "step" not in detail:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.last_stage = event.stage

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    if kind == "s":
        return f"{value * 1000:,.1f} ms"
    if kind == "acc":
        return f"{value:.4f}"
    return f"{int(value):,}"


TABLE_ROWS = (
    ("params", "params", "n"),
    ("weight_bytes", "weight bytes", "bytes"),
    ("flops", "FLOPs/example", "n"),
    ("peak_memory_bytes", "peak train memory", "bytes"),
    ("train_step_seconds", "train step (median)", "s"),
    ("train_step_p90_seconds", "train step (p90)", "s"),
    ("latency_batch1_seconds", "latency batch 1", "s"),
    ("latency_batch_seconds", "latency batch", "s"),
    ("accuracy", "top-1 accuracy", "acc"),
)


def format_table(report: dict[str, Any]) -> str:
    """The before/after table: one column per candidate, ratios to the original."""
    original = report["original"]
    cands = report["candidates"]
    head = ["metric", "original"] + [f"pruned {c['ratio']:g}" for c in cands]
    lines = []
    for key, label, kind in TABLE_ROWS:
        row = [label, _fmt(original.get(key), kind)]
        for c in cands:
            v, o = c["figures"].get(key), original.get(key)
            cell = _fmt(v, kind)
            if kind != "acc" and v is not None and o:
                cell += f" ({v / o:.2f}x)"
            row.append(cell)
        lines.append(row)
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines]
    how = original.get("how", {})
    out.append(
        f"measured on {how.get('device')} batch {how.get('batch_size')}, "
        f"{how.get('steps')} timed steps after {how.get('warmup_steps')} warm-up, "
        f"xla={how.get('xla')}; memory: {how.get('memory')}"
    )
    out.append(f"decision: {report.get('decision')}")
    if report.get("output_uri"):
        out.append(f"published: {report['output_uri']}")
    return "\n".join(out)


def cmd_prune(args: argparse.Namespace) -> int:
    # Must be set before TensorFlow starts: it makes the CPU allocator report
    # peak memory, which the measurement stage needs.
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from secateur.pruner.errors import CancelledError, SecateurError
    from secateur.server.pipeline import GateFailed, PruneJob, write_curves
    from secateur.server.storage import Storage, StorageError

    bar = ProgressBar()
    try:
        request = build_request(args)
        storage = Storage(args.allowed_uri_prefix or None)
        report = PruneJob(request, storage, on_event=bar).run()
        code = EXIT_OK
    except GateFailed as gate:
        report, code = gate.report, EXIT_GATE
    except (SecateurError, StorageError, ValueError, OSError) as exc:
        bar.close()
        if isinstance(exc, CancelledError):
            print(f"secateur: cancelled: {exc}", file=sys.stderr)
            return EXIT_CANCELLED
        print(f"secateur: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        bar.close()
        print("secateur: cancelled; nothing was published", file=sys.stderr)
        return EXIT_CANCELLED
    bar.close()
    print(format_table(report))
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
        if len(report["candidates"]) > 1:
            stem = os.path.splitext(args.report)[0]
            for path in write_curves(report, stem):
                print(f"curve: {path}")
    if code == EXIT_GATE:
        print(f"secateur: accuracy gate failed: {report.get('decision')}", file=sys.stderr)
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tempfile

    from secateur.server.demo import DemoConfig, run_demo
    from secateur.server.pipeline import GateFailed

    workdir = args.workdir or tempfile.mkdtemp(prefix="secateur-demo-")
    cfg = DemoConfig(workdir=workdir, ratios=args.ratios, finetune_epochs=args.epochs)
    bar = ProgressBar()
    code = EXIT_OK
    try:
        report = run_demo(cfg, on_event=bar, log=lambda m: print(m, file=sys.stderr))
    except GateFailed as gate:
        report, code = gate.report, EXIT_GATE
    bar.close()
    print(format_table(report))
    print(f"work directory: {workdir}")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secateur",
        description="Structured channel pruning for Keras models.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 bad input, 3 accuracy gate failed, "
        "4 cancelled.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="prune, fine-tune, measure and publish locally (no server)")
    p.add_argument("model_uri", help=".keras/.h5 file or SavedModel dir: path, file:// or gs://")
    p.add_argument("output_uri", help="base URI; the model is written to OUTPUT_URI/<version>/")
    add_spec_arguments(p)
    p.add_argument("--version", type=int, help="TF Serving version to write (default: next free)")
    p.add_argument("--report", help="write the JSON report here (and curves beside it for a sweep)")
    p.add_argument(
        "--allowed-uri-prefix",
        action="append",
        help="only read/write under these prefixes (repeatable; default: anywhere)",
    )
    p.set_defaults(func=cmd_prune)
    d = sub.add_parser(
        "demo", help="the embedded default: train VGG-16-BN on bundled digits, then prune it"
    )
    d.add_argument("--workdir", help="where data, model and output go (default: a temp dir)")
    d.add_argument("--ratios", type=_ratios, default=(0.3, 0.5, 0.7))
    d.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs per candidate")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
