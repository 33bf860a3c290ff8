"""Between the ``secateur.v1`` messages and plain data.

``job_spec_from_options`` (from :mod:`secateur.client.schema`) turns flat
options (flags over a ``--spec`` file) into a ``JobSpec``; ``report_from_job``
turns a finished job's ``JobResult`` back into the report dict the CLI prints
(the same shape ``secateur prune`` writes). Imports protobuf only.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from secateur.v1 import enums, pruning_pb2

from .schema import KNOWN_OPTIONS, job_spec_from_options

__all__ = ["KNOWN_OPTIONS", "job_spec_from_options", "report_from_job"]

# Metrics field -> Python type of the figures value, from the contract
# (``how`` is a Struct, a plain dict in the report).
FIGURE_TYPES: dict[str, type] = {
    f.name: float if f.type == f.TYPE_DOUBLE else int
    for f in pruning_pb2.Metrics.DESCRIPTOR.fields
    if f.name != "how"
}
# Fields with explicit presence: absent means "not measured" (None), not 0.
OPTIONAL_FIGURES = frozenset(
    f.name for f in pruning_pb2.Metrics.DESCRIPTOR.fields if f.has_presence and f.name != "how"
)


def _plain(value: Any) -> Any:
    """JSON from a Struct with integral floats back to ints (Struct holds only doubles)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def figures_from_metrics(metrics: pruning_pb2.Metrics) -> dict[str, Any]:
    """One variant's figures as in the local report: numbers typed, unmeasured None."""
    data = json_format.MessageToDict(
        metrics,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    out: dict[str, Any] = {}
    for key, kind in FIGURE_TYPES.items():
        value = data.get(key)
        out[key] = None if value is None else kind(value)  # int64 arrive as strings
    out["how"] = _plain(data.get("how") or {})
    return out


def code_name(code: int) -> str:
    """``google.rpc.Code`` name of a status code number (``CODE_42`` when unknown)."""
    from google.rpc import code_pb2

    try:
        return code_pb2.Code.Name(code)
    except ValueError:
        return f"CODE_{code}"


def _struct(message: Any, field: str) -> Any:
    if not message.HasField(field):
        return None
    return _plain(json_format.MessageToDict(getattr(message, field)))


def _optional(message: Any, field: str) -> Any:
    return getattr(message, field) if message.HasField(field) else None


def _targets(result: pruning_pb2.JobResult) -> list[dict[str, Any]]:
    """A target job's targets as plain data (the report's ``targets``)."""
    return [
        {
            "metric": t.metric,
            "wanted": t.wanted,
            "wanted_absolute": t.wanted_absolute,
            "predicted": _optional(t, "predicted"),
            "measured": t.measured,
            "remeasured": _optional(t, "remeasured"),
            "met": t.met,
            "how": _struct(t, "how") or {},
        }
        for t in result.targets
    ]


def _exports(result: pruning_pb2.JobResult) -> list[dict[str, Any]]:
    """The artifacts published beside the SavedModel as plain data (the report's ``exports``)."""
    return [
        {
            "format": enums.short_name(pruning_pb2.ExportFormat, e.format).lower(),
            "file": e.file,
            "bytes": e.size_bytes,
            "samples": e.samples,
            "max_abs_diff": e.max_abs_diff,
        }
        | (_struct(e, "how") or {})
        for e in result.exports
    ]


def report_from_job(job: pruning_pb2.Job) -> dict[str, Any]:
    """The report dict ``cli.format_table`` prints, from a job's ``JobResult``.

    Keys: ``original``, ``candidates`` (``ratio``, ``figures``,
    ``accuracy_drop``, ``plan``), ``pruned``, ``plan``, ``decision``,
    ``outcome`` (``published``, ``gate_failed``, ``curves_only`` or None),
    ``max_accuracy_drop``, ``best_ratio``, ``best_accuracy_drop``,
    ``output_uri`` (None when nothing was published), ``selected_ratio``,
    ``targets`` (a target job: wanted, predicted, measured, remeasured, met,
    how per target; empty otherwise), ``exports`` (format, file, bytes,
    samples, max_abs_diff, exporter, runtime, atol, rtol per artifact), and
    the job's ``job``, ``state``, ``model_uri`` and ``error`` (None or
    ``{"code", "message"}``). ``original`` is None when the job has no result
    (it failed or was cancelled before measuring).
    """
    result = job.result
    has = job.HasField("result")
    candidates = [
        {
            "ratio": c.ratio,
            "figures": figures_from_metrics(c.metrics),
            "accuracy_drop": c.accuracy_drop if c.HasField("accuracy_drop") else None,
            "plan": _struct(c, "plan"),
        }
        for c in result.candidates
    ]
    error = None
    if job.HasField("error") and (job.error.code or job.error.message):
        error = {"code": code_name(job.error.code), "message": job.error.message}
    return {
        "job": job.name,
        "state": enums.short_name(pruning_pb2.Job.State, job.state),
        "model_uri": job.spec.model_uri,
        "original": (
            figures_from_metrics(result.original) if has and result.HasField("original") else None
        ),
        "candidates": candidates,
        "pruned": figures_from_metrics(result.pruned) if result.HasField("pruned") else None,
        "plan": _struct(result, "plan"),
        "selected_ratio": result.selected_ratio if result.HasField("selected_ratio") else None,
        "decision": result.decision or None,
        "outcome": (
            enums.short_name(pruning_pb2.JobResult.Outcome, result.outcome).lower()
            if result.outcome
            else None
        ),
        "max_accuracy_drop": _optional(result, "max_accuracy_drop"),
        "best_ratio": _optional(result, "best_ratio"),
        "best_accuracy_drop": _optional(result, "best_accuracy_drop"),
        "output_uri": result.output_uri or None,
        "targets": _targets(result),
        "exports": _exports(result),
        "error": error,
    }
