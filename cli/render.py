"""What the command prints: the before/after table, job lines (with ``rich``).

Progress is :mod:`secateur.cli.progress`, the plan's text :mod:`secateur.cli.plan`.
Protobuf and ``rich`` only (``secateur.v1`` and the client's ``protospec``): the
client distribution ships this module.
"""

from __future__ import annotations

from typing import Any

from secateur.v1 import enums, pruning_pb2

_UNITS = {
    "bytes": (1024.0, ("B", "KiB", "MiB", "GiB", "TiB")),
    "count": (1000.0, ("", "K", "M", "G", "T")),
}
_TIME_UNITS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns"))


def _three_digits(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def human(value: float | None, kind: str) -> str:
    """``value`` in the unit that suits its size: 3 significant digits.

    ``kind``: ``bytes`` (B, KiB, MiB, GiB: powers of 1024), ``count`` (K, M,
    G: powers of 1000; params, FLOPs), ``s`` (s, ms, µs), ``acc`` (4 decimals).
    """
    if value is None:
        return "n/a"
    if kind == "acc":
        return f"{value:.4f}"
    if kind == "s":
        for scale, unit in _TIME_UNITS:
            if abs(value) >= scale or unit == "ns":
                return f"{_three_digits(value / scale)} {unit}"
    base, units = _UNITS[kind]
    if abs(value) < base:
        return f"{int(value)} B" if kind == "bytes" else f"{int(value)}"
    i = 0
    while abs(value) >= base and i < len(units) - 1:
        value, i = value / base, i + 1
    return (
        f"{_three_digits(value)} {units[i]}" if kind == "bytes" else _three_digits(value) + units[i]
    )


def spread(figures: dict[str, Any]) -> str:
    """The p10-p90 range of the timed training steps, in one unit (n/a before p10 existed)."""
    low, high = figures.get("train_step_p10_seconds"), figures.get("train_step_p90_seconds")
    if not low or not high:
        return "n/a"
    number, unit = human(high, "s").split(" ")
    scale = dict((u, f) for f, u in _TIME_UNITS)[unit]
    return f"{_three_digits(low / scale)}-{number} {unit}"


# (figure, label, kind): the table's rows; kind picks the unit (see human()).
TABLE_ROWS = (
    ("params", "params", "count"),
    ("weight_bytes", "weight bytes", "bytes"),
    ("flops", "FLOPs/example", "count"),
    ("peak_memory_bytes", "peak train memory", "bytes"),
    ("train_step_seconds", "train step (median)", "s"),
    ("train_step_spread", "train step p10-p90", "spread"),
    ("latency_batch1_seconds", "latency batch 1", "s"),
    ("latency_batch_seconds", "latency batch", "s"),
    ("accuracy", "top-1 accuracy", "acc"),
    ("accuracy_drop", "accuracy drop", "drop"),
)


def _cell(figures: dict[str, Any], original: dict[str, Any] | None, key: str, kind: str) -> str:
    """One figure; against ``original`` (a candidate's cell) also the ratio to it."""
    if kind == "spread":
        return spread(figures)
    if kind == "acc":
        return accuracy_cell(figures)
    value, base = figures.get(key), (original or {}).get(key)
    cell = human(value, kind)
    if kind != "acc" and value is not None and base:
        cell += f" ({value / base:.2f}x)"
    return cell


def accuracy_cell(figures: dict[str, Any]) -> str:
    """``93.1% ±1.2 (n=360)``: the accuracy, its 95% interval's half-width in points, n.

    Reports from before the interval was measured show the bare fraction.
    """
    value, n = figures.get("accuracy"), figures.get("eval_examples")
    low, high = figures.get("accuracy_ci_low"), figures.get("accuracy_ci_high")
    if value is None or not n or low is None or high is None:
        return human(value, "acc")
    return f"{100 * value:.1f}% ±{100 * (high - low) / 2:.1f} (n={n})"


def _drop(candidate: dict[str, Any], budget: float | None) -> str:
    drop = candidate.get("accuracy_drop")
    if drop is None:
        return "n/a"
    over = budget is not None and drop > budget
    return f"{drop:+.4f}" + (f" (over {budget:g})" if over else "")


def render_text(renderable: Any, width: int = 160) -> str:
    """What ``rich`` draws for ``renderable``, as plain text without trailing spaces."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in text.splitlines())


def make_table(head: list[str], rows: list[list[str]], right: int = 1, rule: bool = True) -> Any:
    """A plain ``rich`` table: columns from ``right`` on aligned right; a rule under the header."""
    from rich import box
    from rich.table import Table

    style = box.SIMPLE_HEAD if rule else None
    table = Table(box=style, show_edge=False, pad_edge=False, header_style="")
    for i, name in enumerate(head):
        table.add_column(name, justify="right" if i >= right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def format_table(report: dict[str, Any]) -> str:
    """The before/after table: one column per candidate, ratios to the original.

    Units adapt to the size (KiB/MiB, ms/µs, K/M); the accuracy drop row marks
    candidates over the budget; the p10-p90 row shows the spread of the timed
    steps, so a small speed ratio within overlapping spreads reads as noise.
    """
    original = report["original"]
    cands = report["candidates"]
    budget = report.get("max_accuracy_drop")
    head = ["metric", "original"] + [f"pruned {c['ratio']:g}" for c in cands]
    rows = []
    for key, label, kind in TABLE_ROWS:
        if kind == "drop":
            rows.append([label, "-"] + [_drop(c, budget) for c in cands])
            continue
        rows.append(
            [label, _cell(original, None, key, kind)]
            + [_cell(c["figures"], original, key, kind) for c in cands]
        )
    out = [render_text(make_table(head, rows))]
    how = original.get("how", {})
    out.append(
        f"measured on {how.get('device')} batch {how.get('batch_size')}, "
        f"{how.get('steps')} timed steps after {how.get('warmup_steps')} warm-up, "
        f"xla={how.get('xla')}; memory: {how.get('memory')}"
    )
    if report.get("targets"):
        out.append(format_targets(report["targets"]))
    out.append(f"decision: {report.get('decision')}")
    if report.get("output_uri"):
        out.append(f"published: {report['output_uri']}")
    for e in report.get("exports") or []:  # docs/exports.md
        out.append(
            f"  with assets.extra/secateur/{e['file']} ({e['format']}, {human(e['bytes'], 'bytes')}"
            f", max abs diff {e['max_abs_diff']:.2g} vs Keras on {e['samples']} inputs)"
        )
    return "\n".join(out)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_targets(targets: list[dict[str, Any]]) -> str:
    """A target job's targets: wanted, predicted and measured, as fractions of the original.

    ``measured`` is the planner's check of the rebuilt model (or the exact
    count); ``after fine-tune`` the job's own MEASURING stage; the line under
    the table says how the measured figures were obtained.
    """
    rows = []
    for t in targets:
        wanted = f"{t['wanted']:g} (abs)" if t.get("wanted_absolute") else f"{t['wanted']:.3f}"
        rows.append(
            [t["metric"], wanted, _fraction(t.get("predicted")), _fraction(t.get("measured")),
             _fraction(t.get("remeasured")), "yes" if t.get("met") else "NO"]
        )  # fmt: skip
    head = ["target", "wanted", "predicted", "measured", "after fine-tune", "met"]
    lines = [render_text(make_table(head, rows))]
    for t in targets:
        how = t.get("how") or {}
        if "device" in how:
            lines.append(
                f"{t['metric']}: {how.get('device')} batch {how.get('batch_size')}, "
                f"xla={how.get('xla')}, {how.get('timed_steps')} timed steps, "
                f"tolerance {how.get('tolerance')}; profile of "
                f"{how.get('profile_measurements')} variants in {how.get('profile_seconds')} s"
                f"{_where(how)}, {how.get('rounds')} round(s)"
            )
        else:
            lines.append(f"{t['metric']}: {how.get('method', 'counted')}")
    return "\n".join(lines)


def _where(how: dict[str, Any]) -> str:
    """How the profile was made: cached, or in how many child processes."""
    if how.get("profile_cached"):
        return " (cached)"
    processes = how.get("profile_processes")
    failed = ""
    if how.get("profile_isolation_failed"):
        failed = " (its child processes failed: measured in the job's process)"
    return f" in {processes} child process(es){failed}" if processes else failed


def percent(job: pruning_pb2.Job) -> str:
    return f"{min(max(job.progress, 0.0), 1.0):.0%}"


def stage_name(job: pruning_pb2.Job) -> str:
    if job.state == pruning_pb2.Job.STATE_RUNNING and job.stage:
        return enums.short_name(pruning_pb2.Job.Stage, job.stage)
    return "-"


def timestamp(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    from datetime import UTC

    return str(ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S"))


def job_summary(job: pruning_pb2.Job) -> str:
    """One line: name, state, stage, progress, model, and the message or error."""
    from secateur.client.protospec import code_name

    parts = [job.name, enums.short_name(pruning_pb2.Job.State, job.state)]
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
    rows: list[list[str]] = [
        [
            j.name,
            enums.short_name(pruning_pb2.Job.State, j.state),
            stage_name(j),
            percent(j),
            j.spec.model_uri or "-",
            timestamp(j.create_time),
        ]
        for j in jobs
    ]
    return render_text(make_table(head, rows, right=len(head), rule=False))
