"""What the command draws: the progress line, the before/after table, job lines.

Protobuf only (``secateur.v1`` and the client's ``protospec``).
"""

from __future__ import annotations

import sys
from typing import Any

from secateur.v1 import pruning_pb2

# The job stages in order, from the contract (the pipeline's STAGES match it:
# tests/test_proto.py); protobuf only, nothing heavy.
STAGES: tuple[str, ...] = tuple(pruning_pb2.Job.Stage.keys()[1:])


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
        state = pruning_pb2.Job.State.Name(job.state)
        running = job.state == pruning_pb2.Job.STATE_RUNNING and job.stage
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


def _columns(head: list[str], rows: list[list[str]]) -> list[str]:
    """``head`` and ``rows`` as left-aligned columns two spaces apart."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]


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
    first, *rest = _columns(head, lines)
    out = [first, "  ".join("-" * w for w in widths), *rest]
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


def percent(job: pruning_pb2.Job) -> str:
    return f"{min(max(job.progress, 0.0), 1.0):.0%}"


def stage_name(job: pruning_pb2.Job) -> str:
    if job.state == pruning_pb2.Job.STATE_RUNNING and job.stage:
        return pruning_pb2.Job.Stage.Name(job.stage)
    return "-"


def timestamp(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    from datetime import UTC

    return str(ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S"))


def job_summary(job: pruning_pb2.Job) -> str:
    """One line: name, state, stage, progress, model, and the message or error."""
    from secateur.client.protospec import code_name

    parts = [job.name, pruning_pb2.Job.State.Name(job.state)]
    if job.state == pruning_pb2.Job.STATE_RUNNING:
        parts += [stage_name(job), percent(job)]
    parts.append(job.spec.model_uri or "-")
    if job.error.code or job.error.message:
        parts.append(f"{code_name(job.error.code)}: {job.error.message}")
    elif job.message:
        parts.append(job.message)
    if job.result.output_uri:
        parts.append(f"published {job.result.output_uri}")
    return "  ".join(parts)


def jobs_table(jobs: list[pruning_pb2.Job]) -> str:
    """``secateur list``: one row per job, newest first as given."""
    head = ["NAME", "STATE", "STAGE", "PROGRESS", "MODEL", "CREATED"]
    rows = [
        [
            j.name,
            pruning_pb2.Job.State.Name(j.state),
            stage_name(j),
            percent(j),
            j.spec.model_uri or "-",
            timestamp(j.create_time),
        ]
        for j in jobs
    ]
    return "\n".join(line.rstrip() for line in _columns(head, rows))
