"""The ``secateur`` command line.

Subcommands load heavy modules only when they run, so ``secateur --help``
and the client never import TensorFlow.

Local, in-process (import the pruner): ``prune``, ``demo``. Against a server
(grpc and protobuf only; ``--server`` defaults to $SECATEUR_SERVER or
localhost:50051, the bearer token comes from ``--token-file`` or
$SECATEUR_TOKEN): ``submit`` (``--wait`` shows progress, prints the table and
exits by the job's outcome, for CI stages), ``status``, ``watch``, ``cancel``,
``list``.

Exit codes (stable; CI stages gate on them):

====  =========================================================
0     success (for ``status``: also a job still QUEUED or RUNNING)
1     unexpected internal error (traceback printed); a job FAILED
      with INTERNAL or another server-side code; server
      unavailable after retries or no answer within the deadline
2     bad input: invalid spec, model or data; URI not found, not
      allowed or unreachable; output version already exists. For
      jobs and calls: INVALID_ARGUMENT, NOT_FOUND,
      PERMISSION_DENIED, FAILED_PRECONDITION, ALREADY_EXISTS,
      RESOURCE_EXHAUSTED, UNAUTHENTICATED
3     accuracy gate failed: no candidate within --max-accuracy-drop
      (nothing published)
4     cancelled: Ctrl-C / SIGTERM (``prune``, ``demo``: the run
      stops, nothing is published; ``submit --wait``, ``watch``:
      the job goes on unless --cancel-on-interrupt); a job that
      ended CANCELLED
====  =========================================================
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from secateur.v1 import pruning_pb2

if TYPE_CHECKING:
    from secateur.client.client import ClientError, PruningClient

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_GATE, EXIT_CANCELLED = 0, 1, 2, 3, 4

DEFAULT_SERVER = "localhost:50051"
# The job stages in order, from the contract (the pipeline's STAGES match it:
# tests/test_proto.py); protobuf only, nothing heavy.
STAGES: tuple[str, ...] = tuple(pruning_pb2.Job.Stage.keys()[1:])
# google.rpc.Code numbers that mean the request or its inputs were wrong.
BAD_INPUT_CODES = frozenset(
    {
        3,  # INVALID_ARGUMENT
        5,  # NOT_FOUND
        6,  # ALREADY_EXISTS
        7,  # PERMISSION_DENIED
        8,  # RESOURCE_EXHAUSTED
        9,  # FAILED_PRECONDITION
        16,  # UNAUTHENTICATED
    }
)
CODE_CANCELLED = 1
EXIT_CODES_EPILOG = (
    "Exit codes: 0 ok (status: also a job still queued or running); 1 internal error, "
    "a job that failed on the server's side, server unavailable; 2 bad input (invalid spec, "
    "model or data, URI not found / not allowed, version exists; INVALID_ARGUMENT, NOT_FOUND, "
    "PERMISSION_DENIED, FAILED_PRECONDITION, ALREADY_EXISTS, RESOURCE_EXHAUSTED, "
    "UNAUTHENTICATED); 3 accuracy gate failed, nothing published; 4 cancelled."
)


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ratios must be numbers separated by commas: {text!r}"
        ) from None


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"round-to must be an integer or 'auto': {text!r}"
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
    g.add_argument(
        "--round-to",
        type=_round_to,
        dest="round_to",
        help="kept channel counts are multiples of N; 'auto' = the device's layout multiple",
    )
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
    """A one-line progress display on stderr (plain lines when not a TTY).

    Called with a pipeline event (``stage``, ``progress`` within the stage,
    ``message``, ``detail``) for local runs; ``job(job)`` draws a
    ``secateur.v1.Job`` snapshot (overall ``progress``) while watching a server.
    """

    def __init__(self, stream: Any = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.width = width
        self.last_stage = ""
        self.last_progress = -1.0
        self.drawn = False

    def _bar(self, fraction: float) -> str:
        filled = int(self.width * min(max(fraction, 0.0), 1.0))
        return "#" * filled + "-" * (self.width - filled)

    def _write(self, line: str, plain: bool) -> None:
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
            self.drawn = True
        elif plain:
            self.stream.write(line + "\n")
        self.stream.flush()

    def __call__(self, event: Any) -> None:
        idx = STAGES.index(event.stage) if event.stage in STAGES else 0
        fraction = (idx + min(max(event.progress, 0.0), 1.0)) / len(STAGES)
        detail = event.detail
        extra = ""
        if "step" in detail:
            loss = detail.get("loss")
            extra = f" epoch {detail['epoch']}/{detail['epochs']} step {detail['step']}"
            extra += f" loss {loss:.3f}" if loss is not None else ""
        line = f"[{self._bar(fraction)}] {event.stage:<11} {event.message}{extra}"
        self._write(line, event.stage != self.last_stage or "step" not in detail)
        self.last_stage = event.stage

    def job(self, job: pruning_pb2.Job) -> None:
        """Draw a job snapshot: a plain line on a change of state or stage, or every 5%."""
        from secateur.v1 import pruning_pb2

        state = pruning_pb2.Job.State.Name(job.state)
        running = job.state == pruning_pb2.Job.RUNNING and job.stage
        stage = pruning_pb2.Job.Stage.Name(job.stage) if running else state
        progress = min(max(job.progress, 0.0), 1.0)
        line = f"[{self._bar(progress)}] {stage:<11} {progress:4.0%} {job.message}".rstrip()
        plain = stage != self.last_stage or progress - self.last_progress >= 0.05
        self._write(line, plain)
        if plain:
            self.last_progress = progress
        self.last_stage = stage

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


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
    stop = _StopOnSignals()
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

    from secateur.client.protospec import report_from_job
    from secateur.server.demo import DemoConfig, run_demo

    workdir = args.workdir or tempfile.mkdtemp(prefix="secateur-demo-")
    cfg = DemoConfig(workdir=workdir, ratios=args.ratios, finetune_epochs=args.epochs)
    bar = ProgressBar()
    try:
        with _sigterm_as_interrupt():
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


# -- against a server: submit, status, watch, cancel, list ---------------------


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """Where the server is and how to reach it (``submit``, ``status``, ...)."""
    g = p.add_argument_group("server connection")
    g.add_argument(
        "--server",
        help=f"HOST:PORT of the Secateur server (default: $SECATEUR_SERVER or {DEFAULT_SERVER})",
    )
    g.add_argument(
        "--token-file",
        dest="token_file",
        help="file holding the bearer token (default: $SECATEUR_TOKEN, if set)",
    )
    g.add_argument("--tls", action="store_true", help="connect with TLS")
    g.add_argument("--ca-cert", dest="ca_cert", help="PEM root certificates (implies --tls)")
    g.add_argument("--client-cert", dest="client_cert", help="PEM client certificate (mTLS)")
    g.add_argument("--client-key", dest="client_key", help="PEM client private key (mTLS)")
    g.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="deadline of each request in seconds (default 30; watching has none)",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=4,
        help="retries of a call the server could not take (UNAVAILABLE; default 4)",
    )


def server_address(args: argparse.Namespace) -> str:
    return args.server or os.environ.get("SECATEUR_SERVER") or DEFAULT_SERVER


class _UsageError(Exception):
    """Bad local input (flags, files): exit 2 with the message."""


def _read_file(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise _UsageError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def connect(args: argparse.Namespace) -> PruningClient:
    """A ``PruningClient`` from the connection flags."""
    from secateur.client.client import PruningClient

    if args.token_file:
        token = (_read_file(args.token_file, "token file") or b"").decode().strip()
    else:
        token = os.environ.get("SECATEUR_TOKEN", "").strip()
    if args.token_file and not token:
        raise _UsageError(f"the token file {args.token_file} is empty")
    if bool(args.client_cert) != bool(args.client_key):
        raise _UsageError("--client-cert and --client-key go together (mTLS)")
    if args.retries < 0 or args.timeout <= 0:
        raise _UsageError(
            f"--retries must be >= 0 and --timeout > 0. "
            f"Received: --retries {args.retries} --timeout {args.timeout}"
        )
    return PruningClient(
        server_address(args),
        token=token or None,
        tls=bool(args.tls or args.ca_cert or args.client_cert),
        root_certificates=_read_file(args.ca_cert, "CA certificate"),
        certificate_chain=_read_file(args.client_cert, "client certificate"),
        private_key=_read_file(args.client_key, "client key"),
        timeout=args.timeout,
        retries=args.retries,
    )


def gate_failed(job: pruning_pb2.Job) -> bool:
    """The job ran but its accuracy gate published nothing.

    The server reports a failed gate as FAILED with FAILED_PRECONDITION and a
    result whose decision says "no candidate within ...; nothing published";
    a SUCCEEDED job with a budget and nothing published counts too.
    """
    from secateur.v1 import pruning_pb2

    if not job.HasField("result") or job.result.output_uri:
        return False
    decision = job.result.decision
    if "no candidate within" in decision:
        return job.state in (pruning_pb2.Job.SUCCEEDED, pruning_pb2.Job.FAILED)
    if job.state == pruning_pb2.Job.SUCCEEDED:
        return job.spec.HasField("max_accuracy_drop")
    return (
        job.state == pruning_pb2.Job.FAILED
        and job.error.code == 9  # FAILED_PRECONDITION
        and "nothing published" in decision
        and len(job.result.candidates) > 0
    )


def exit_code_for_job(job: pruning_pb2.Job) -> int:
    """The exit code a job's state stands for (0 while it is queued or running)."""
    from secateur.v1 import pruning_pb2

    if gate_failed(job):
        return EXIT_GATE
    if job.state == pruning_pb2.Job.CANCELLED:
        return EXIT_CANCELLED
    if job.state == pruning_pb2.Job.FAILED:
        if job.error.code in BAD_INPUT_CODES:
            return EXIT_BAD_INPUT
        return EXIT_CANCELLED if job.error.code == CODE_CANCELLED else EXIT_INTERNAL
    return EXIT_OK


def exit_code_for_error(err: ClientError) -> int:
    """The exit code of a failed call: the server refused (2), was unreachable (1), ..."""
    code = err.code.value[0]
    if code in BAD_INPUT_CODES:
        return EXIT_BAD_INPUT
    return EXIT_CANCELLED if code == CODE_CANCELLED else EXIT_INTERNAL


def _print_error(err: ClientError, args: argparse.Namespace) -> int:
    name = err.code.name
    server = server_address(args)
    if name == "UNAVAILABLE":
        msg = f"server {server} unavailable after {err.attempts} attempt(s): {err.details}"
    elif name == "DEADLINE_EXCEEDED":
        msg = f"no answer from {server} within {args.timeout:g}s ({err.method or 'call'})"
    else:
        msg = f"{name}: {err.details}"
    print(f"secateur: error: {msg}", file=sys.stderr)
    for field, description in err.field_violations:
        print(f"  {field}: {description}", file=sys.stderr)
    return exit_code_for_error(err)


def _percent(job: pruning_pb2.Job) -> str:
    return f"{min(max(job.progress, 0.0), 1.0):.0%}"


def _stage(job: pruning_pb2.Job) -> str:
    from secateur.v1 import pruning_pb2

    if job.state == pruning_pb2.Job.RUNNING and job.stage:
        return pruning_pb2.Job.Stage.Name(job.stage)
    return "-"


def _time(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    from datetime import UTC

    return str(ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S"))


def job_summary(job: pruning_pb2.Job) -> str:
    """One line: name, state, stage, progress, model, and the message or error."""
    from secateur.client.protospec import code_name
    from secateur.v1 import pruning_pb2

    parts = [job.name, pruning_pb2.Job.State.Name(job.state)]
    if job.state == pruning_pb2.Job.RUNNING:
        parts += [_stage(job), _percent(job)]
    parts.append(job.spec.model_uri or "-")
    if job.error.code or job.error.message:
        parts.append(f"{code_name(job.error.code)}: {job.error.message}")
    elif job.message:
        parts.append(job.message)
    if job.result.output_uri:
        parts.append(f"published {job.result.output_uri}")
    return "  ".join(parts)


def finish_job(
    job: pruning_pb2.Job, report_path: str | None = None, *, summary: bool = True
) -> int:
    """Print a terminal job's table (stdout) and what went wrong (stderr); its exit code.

    A job without figures (failed or cancelled early) gets its summary line
    instead of the table (unless ``summary`` is False: the caller printed it).
    """
    from secateur.client.client import violations_from_status
    from secateur.client.protospec import code_name, report_from_job
    from secateur.v1 import pruning_pb2

    report = report_from_job(job)
    if report["original"] is not None:
        print(format_table(report))
    elif summary:
        print(job_summary(job))
    if report_path:
        with open(report_path, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
    code = exit_code_for_job(job)
    if code == EXIT_GATE:
        print(f"secateur: accuracy gate failed: {job.result.decision}", file=sys.stderr)
    elif job.state == pruning_pb2.Job.CANCELLED:
        print(f"secateur: {job.name} was cancelled; nothing was published", file=sys.stderr)
    elif job.state == pruning_pb2.Job.FAILED:
        what = f"{code_name(job.error.code)}: {job.error.message}"
        print(f"secateur: {job.name} failed: {what}", file=sys.stderr)
        for field, description in violations_from_status(job.error):
            print(f"  {field}: {description}", file=sys.stderr)
    return code


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI runner stopping the stage) handled like Ctrl-C while waiting."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _StopOnSignals:
    """SIGINT and SIGTERM for a local run, alike: the first asks the run to stop
    at its next check point (a training step, a stage, a data chunk), so that
    it unwinds and publishes nothing; a second one stops it at once.

    Called, it says whether a stop was asked (the job's ``should_cancel``).
    Nothing is printed from the handler: the progress bar may be mid-write.
    """

    def __init__(self) -> None:
        self.signal = ""

    def __call__(self) -> bool:
        return bool(self.signal)

    def what(self) -> str:
        return f"{self.signal}: " if self.signal else ""

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.signal:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    @contextmanager
    def installed(self) -> Iterator[None]:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _wait_and_finish(client: PruningClient, name: str, args: argparse.Namespace) -> int:
    bar = ProgressBar()
    try:
        with _sigterm_as_interrupt():
            job = client.wait(name, on_update=bar.job)
    except KeyboardInterrupt:
        bar.close()
        if args.cancel_on_interrupt:
            job = client.cancel(name)
            state = job.State.Name(job.state)
            print(f"secateur: interrupted; cancelled {name} ({state})", file=sys.stderr)
        else:
            print(
                f"secateur: stopped watching; {name} goes on on the server "
                f"(secateur cancel {name} stops it)",
                file=sys.stderr,
            )
        return EXIT_CANCELLED
    bar.close()
    return finish_job(job, getattr(args, "report", None))


def _remote(run: Any) -> Any:
    """Wrap a server subcommand: connect, map call errors and bad local input to exit codes."""

    def wrapped(args: argparse.Namespace) -> int:
        from secateur.client.client import ClientError

        try:
            with connect(args) as client:
                return int(run(client, args))
        except ClientError as err:
            return _print_error(err, args)
        except (_UsageError, ValueError, OSError) as exc:
            print(f"secateur: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT

    wrapped.__name__ = run.__name__
    wrapped.__doc__ = run.__doc__
    return wrapped


def _submit(client: PruningClient, args: argparse.Namespace) -> int:
    """Create a job from the spec flags; with --wait, follow it and exit by its outcome."""
    from secateur.client.protospec import job_spec_from_options

    spec = job_spec_from_options(args.model_uri, args.output_uri, merged_options(args))
    job = client.create(spec, request_id=args.request_id, validate_only=args.validate_only)
    if args.validate_only:
        print(f"valid: the server would accept this job ({args.model_uri} -> {args.output_uri})")
        return EXIT_OK
    if not args.wait:
        print(job.name)
        return EXIT_OK
    print(f"submitted {job.name}", file=sys.stderr)
    return _wait_and_finish(client, job.name, args)


def _status(client: PruningClient, args: argparse.Namespace) -> int:
    """Print a job's summary, and its table once it has ended."""
    from secateur.client.client import is_terminal, job_name

    job = client.get(job_name(args.job))
    print(job_summary(job))
    if not is_terminal(job):
        return EXIT_OK
    return finish_job(job, args.report, summary=False)


def _watch(client: PruningClient, args: argparse.Namespace) -> int:
    """Follow a job to its end; its table and exit code."""
    from secateur.client.client import job_name

    return _wait_and_finish(client, job_name(args.job), args)


def _cancel(client: PruningClient, args: argparse.Namespace) -> int:
    """Cancel a queued or running job; print its state after."""
    from secateur.client.client import is_terminal, job_name
    from secateur.v1 import pruning_pb2

    job = client.cancel(job_name(args.job))
    state = pruning_pb2.Job.State.Name(job.state)
    note = "" if job.state == pruning_pb2.Job.CANCELLED or not is_terminal(job) else " (had ended)"
    print(f"{job.name} {state}{note}")
    return EXIT_OK


def _list(client: PruningClient, args: argparse.Namespace) -> int:
    """A table of jobs, newest first."""
    import itertools

    from secateur.v1 import pruning_pb2

    if args.limit is not None and args.limit < 1:
        raise _UsageError(f"--limit must be >= 1. Received: {args.limit}")
    page = min(args.limit or 100, 100)
    jobs = list(itertools.islice(client.list(args.state, page_size=page), args.limit))
    head = ["NAME", "STATE", "STAGE", "PROGRESS", "MODEL", "CREATED"]
    rows = [
        [
            j.name,
            pruning_pb2.Job.State.Name(j.state),
            _stage(j),
            _percent(j),
            j.spec.model_uri or "-",
            _time(j.create_time),
        ]
        for j in jobs
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


cmd_submit = _remote(_submit)
cmd_status = _remote(_status)
cmd_watch = _remote(_watch)
cmd_cancel = _remote(_cancel)
cmd_list = _remote(_list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secateur",
        description="Structured channel pruning for Keras models.",
        epilog=EXIT_CODES_EPILOG,
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
    sv = sub.add_parser(
        "serve",
        help="run the gRPC pruning service (see `secateur serve --help`)",
        add_help=False,
    )
    sv.add_argument("serve_args", nargs=argparse.REMAINDER)  # handled in main()
    _add_server_commands(sub)
    return parser


def _add_server_commands(sub: Any) -> None:
    states = ["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
    p = sub.add_parser(
        "submit",
        help="submit a pruning job to a server (--wait: follow it, exit by its outcome)",
        epilog=EXIT_CODES_EPILOG,
    )
    p.add_argument("model_uri", help=".keras/.h5 file or SavedModel dir, as the server sees it")
    p.add_argument("output_uri", help="base URI; the model is published to OUTPUT_URI/<version>/")
    add_spec_arguments(p)
    p.add_argument("--version", type=int, help="TF Serving version to publish (default: next free)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="show progress until the job ends, print the table, exit by the outcome",
    )
    p.add_argument("--report", help="with --wait: write the JSON report here")
    p.add_argument(
        "--request-id",
        dest="request_id",
        help="idempotency key: submitting it again returns the same job (default: random)",
    )
    p.add_argument(
        "--validate-only",
        action="store_true",
        dest="validate_only",
        help="have the server check the request (URIs, spec, model) without creating a job",
    )
    p.add_argument(
        "--cancel-on-interrupt",
        action="store_true",
        dest="cancel_on_interrupt",
        help="with --wait: Ctrl-C / SIGTERM cancels the job (default: it goes on)",
    )
    add_connection_arguments(p)
    p.set_defaults(func=cmd_submit)

    st = sub.add_parser(
        "status",
        help="a job's state; its table once it has ended",
        epilog=EXIT_CODES_EPILOG,
    )
    st.add_argument("job", help="jobs/<id> or <id>")
    st.add_argument("--report", help="write the JSON report here when the job has ended")
    add_connection_arguments(st)
    st.set_defaults(func=cmd_status)

    w = sub.add_parser(
        "watch",
        help="follow a job until it ends; its table and exit code",
        epilog=EXIT_CODES_EPILOG,
    )
    w.add_argument("job", help="jobs/<id> or <id>")
    w.add_argument("--report", help="write the JSON report here")
    w.add_argument(
        "--cancel-on-interrupt",
        action="store_true",
        dest="cancel_on_interrupt",
        help="Ctrl-C / SIGTERM cancels the job (default: it goes on)",
    )
    add_connection_arguments(w)
    w.set_defaults(func=cmd_watch)

    c = sub.add_parser("cancel", help="cancel a queued or running job", epilog=EXIT_CODES_EPILOG)
    c.add_argument("job", help="jobs/<id> or <id>")
    add_connection_arguments(c)
    c.set_defaults(func=cmd_cancel)

    ls = sub.add_parser("list", help="jobs on the server, newest first", epilog=EXIT_CODES_EPILOG)
    ls.add_argument("--state", type=str.upper, choices=states, help="only jobs in this state")
    ls.add_argument("--limit", type=int, default=20, help="at most this many jobs (default 20)")
    add_connection_arguments(ls)
    ls.set_defaults(func=cmd_list)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # The server owns its flags; argparse's REMAINDER cannot pass "--help" through.
        from secateur.server.main import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
