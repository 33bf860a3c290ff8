"""Between the CLI's flat options and the ``secateur.v1`` messages.

``job_spec_from_options`` turns the dict ``cli.merged_options`` makes (flags
over a ``--spec`` file) into a ``JobSpec``; ``report_from_job`` turns a finished
job's ``JobResult`` back into the report dict ``cli.format_table`` prints (the
same shape ``secateur prune`` writes). Imports protobuf only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from secateur.v1 import pruning_pb2

CRITERIA: dict[str, int] = {
    "bn_scale": pruning_pb2.BN_SCALE,
    "l1": pruning_pb2.L1,
    "l2": pruning_pb2.L2,
    "random": pruning_pb2.RANDOM,
}
SCOPES: dict[str, int] = {"global": pruning_pb2.GLOBAL, "layerwise": pruning_pb2.LAYERWISE}

# Metrics field -> Python type of the figures value (``how`` is a plain dict).
FIGURE_TYPES: dict[str, type] = {
    "params": int,
    "weight_bytes": int,
    "flops": int,
    "peak_memory_bytes": int,
    "train_step_seconds": float,
    "train_step_p90_seconds": float,
    "latency_batch1_seconds": float,
    "latency_batch_seconds": float,
    "accuracy": float,
}
# Fields with explicit presence: absent means "not measured" (None), not 0.
OPTIONAL_FIGURES = frozenset({"peak_memory_bytes", "accuracy"})

_PRUNING_SCALARS = {"ratio": float, "round_to": int, "min_channels": int, "seed": int}
_TRAINING_SCALARS = {
    "epochs": int,
    "batch_size": int,
    "learning_rate": float,
    "train_data": str,
    "eval_data": str,
    "image_key": str,
    "label_key": str,
    "measure_steps": int,
}
KNOWN_OPTIONS = frozenset(
    set(_PRUNING_SCALARS)
    | set(_TRAINING_SCALARS)
    | {
        "ratios",
        "criterion",
        "scope",
        "exclude",
        "reload_weights",
        "resize",
        "max_accuracy_drop",
        "version",
    }
)


def _convert(name: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind``; a ValueError naming the field otherwise (bools are not numbers)."""
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string. Received: {name}={value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number. Received: {name}={value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer. Received: {name}={value!r}")
        return int(value)
    return float(value)


def _choice(name: str, value: Any, choices: Mapping[str, int]) -> int:
    key = str(value).lower()
    if key not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}. Received: {name}={value!r}")
    return choices[key]


def job_spec_from_options(
    model_uri: str, output_uri: str, opts: Mapping[str, Any]
) -> pruning_pb2.JobSpec:
    """A ``JobSpec`` from the flat options of ``cli.merged_options`` (None = not given).

    Raises:
        ValueError: an unknown field, or a value of the wrong type or out of
            the choices, naming the field and the value received. Range checks
            (ratio in [0, 1), ...) are the server's, which answers with
            INVALID_ARGUMENT and field violations.
    """
    unknown = sorted(set(opts) - KNOWN_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s); known: {sorted(KNOWN_OPTIONS)}. Received: {unknown}")
    spec = pruning_pb2.JobSpec(model_uri=model_uri, output_uri=output_uri)
    given = {k: v for k, v in opts.items() if v is not None}
    pruning, training = spec.pruning, spec.training
    if given.get("round_to") == "auto":
        pruning.round_to_auto = True
        given.pop("round_to")
    for name, kind in _PRUNING_SCALARS.items():
        if name in given:
            setattr(pruning, name, _convert(name, given[name], kind))
    if "ratios" in given:
        ratios = given["ratios"]
        if isinstance(ratios, str | bytes) or not hasattr(ratios, "__iter__"):
            raise ValueError(f"ratios must be a list of numbers. Received: ratios={ratios!r}")
        pruning.ratios.extend(_convert("ratios", r, float) for r in ratios)
    if "criterion" in given:
        pruning.criterion = _choice("criterion", given["criterion"], CRITERIA)  # type: ignore[assignment]
    if "scope" in given:
        pruning.scope = _choice("scope", given["scope"], SCOPES)  # type: ignore[assignment]
    if "exclude" in given:
        exclude = given["exclude"]
        names = [exclude] if isinstance(exclude, str) else list(exclude)
        pruning.exclude.extend(_convert("exclude", n, str) for n in names)
    if "reload_weights" in given:
        pruning.no_reload = not bool(given["reload_weights"])
    for name, kind in _TRAINING_SCALARS.items():
        if name in given:
            setattr(training, name, _convert(name, given[name], kind))
    if "resize" in given:
        training.resize = bool(given["resize"])
    if "max_accuracy_drop" in given:
        spec.max_accuracy_drop = _convert("max_accuracy_drop", given["max_accuracy_drop"], float)
    if "version" in given:
        spec.version = _convert("version", given["version"], int)
    return spec


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


def report_from_job(job: pruning_pb2.Job) -> dict[str, Any]:
    """The report dict ``cli.format_table`` prints, from a job's ``JobResult``.

    Keys: ``original``, ``candidates`` (``ratio``, ``figures``,
    ``accuracy_drop``, ``plan``), ``pruned``, ``plan``, ``decision``,
    ``output_uri`` (None when nothing was published), ``selected_ratio``, and
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
        "state": pruning_pb2.Job.State.Name(job.state),
        "model_uri": job.spec.model_uri,
        "original": (
            figures_from_metrics(result.original) if has and result.HasField("original") else None
        ),
        "candidates": candidates,
        "pruned": figures_from_metrics(result.pruned) if result.HasField("pruned") else None,
        "plan": _struct(result, "plan"),
        "selected_ratio": result.selected_ratio if result.HasField("selected_ratio") else None,
        "decision": result.decision or None,
        "output_uri": result.output_uri or None,
        "error": error,
    }
