"""Messages <-> domain objects. No TensorFlow: the service validates with these.

Field violations name proto paths (``spec.pruning.ratio``) so a client can
point at what it sent.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from secateur.pruner.config import MeasureConfig, TrainConfig
from secateur.pruner.data import DataSpec
from secateur.pruner.errors import InvalidSpecError
from secateur.pruner.spec import PruneSpec
from secateur.pruner.targets import Targets
from secateur.server.errors import ServiceError
from secateur.server.pipeline.job_request import MAX_RATIOS, JobRequest
from secateur.v1 import enums
from secateur.v1 import pruning_pb2 as pb

# Where each JobSpec field goes in the library: proto path (under JobSpec)
# -> (the TF-free dataclass that owns it and defines its default, its field
# there). Unset fields are simply not passed, so the dataclass default applies:
# the library's defaults are the only ones, for `secateur prune` and a job alike.
LIBRARY_FIELDS: dict[str, tuple[type, str]] = {
    "pruning.ratio": (PruneSpec, "ratio"),
    "pruning.ratios": (JobRequest, "ratios"),
    "pruning.criterion": (PruneSpec, "criterion"),
    "pruning.scope": (PruneSpec, "scope"),
    "pruning.round_to": (PruneSpec, "round_to"),
    "pruning.round_to_auto": (PruneSpec, "round_to"),
    "pruning.min_channels": (PruneSpec, "min_channels"),
    "pruning.exclude": (PruneSpec, "exclude"),
    "pruning.reload_weights": (PruneSpec, "reload_weights"),
    "pruning.seed": (PruneSpec, "seed"),
    "pruning.bias_compensation": (PruneSpec, "bias_compensation"),
    "pruning.taylor_batches": (PruneSpec, "taylor_batches"),
    "pruning.iterative_steps": (PruneSpec, "iterative_steps"),
    "pruning.iterative_schedule": (PruneSpec, "iterative_schedule"),
    "pruning.head_ratio": (PruneSpec, "head_ratio"),
    "pruning.targets.step_time": (Targets, "step_time"),
    "pruning.targets.latency": (Targets, "latency"),
    "pruning.targets.latency_ms": (Targets, "latency_ms"),
    "pruning.targets.latency_batch": (Targets, "latency_batch"),
    "pruning.targets.peak_memory": (Targets, "peak_memory"),
    "pruning.targets.params": (Targets, "params"),
    "pruning.targets.max_params": (Targets, "max_params"),
    "pruning.targets.flops": (Targets, "flops"),
    "pruning.targets.max_flops": (Targets, "max_flops"),
    "pruning.targets.tolerance": (Targets, "tolerance"),
    "pruning.targets.corrections": (Targets, "corrections"),
    "pruning.targets.max_group_ratio": (Targets, "max_group_ratio"),
    "training.epochs": (TrainConfig, "epochs"),
    "training.batch_size": (TrainConfig, "batch_size"),
    "training.learning_rate": (TrainConfig, "learning_rate"),
    "training.train_data": (JobRequest, "train_data"),
    "training.eval_data": (JobRequest, "eval_data"),
    "training.image_key": (DataSpec, "image_key"),
    "training.label_key": (DataSpec, "label_key"),
    "training.resize": (DataSpec, "resize"),
    "training.measure_steps": (MeasureConfig, "steps"),
    "training.deterministic": (TrainConfig, "deterministic"),
    "training.steps_per_execution": (TrainConfig, "steps_per_execution"),
    "training.mixed_precision": (TrainConfig, "mixed_precision"),
    "training.cache_mib": (DataSpec, "cache_mib"),
    "training.sparsity_epochs": (TrainConfig, "sparsity_epochs"),
    "training.sparsity_lambda": (TrainConfig, "sparsity_lambda"),
    "training.distill_alpha": (TrainConfig, "distill_alpha"),
    "training.distill_temperature": (TrainConfig, "distill_temperature"),
    "training.bn_recalibration_batches": (TrainConfig, "bn_recalibration_batches"),
    "max_accuracy_drop": (JobRequest, "max_accuracy_drop"),
    "version": (JobRequest, "version"),
    "max_run_seconds": (JobRequest, "max_run_seconds"),
    "exports": (JobRequest, "exports"),
}
# A library field's name -> its request path, for the field violations of
# the library's InvalidSpecError (which names its own field).
_FIELD_PATHS = {
    "model_uri": "spec.model_uri",
    "output_uri": "spec.output_uri",
    "targets": "spec.pruning.targets",  # none set
} | {field: f"spec.{path}" for path, (_, field) in LIBRARY_FIELDS.items() if "auto" not in path}


def defaults() -> dict[str, Any]:
    """Proto path -> the library default an unset field takes (None: absent)."""
    out: dict[str, Any] = {}
    for path, (owner, name) in LIBRARY_FIELDS.items():
        f = {f.name: f for f in dataclasses.fields(owner)}[name]
        default = f.default_factory() if callable(f.default_factory) else f.default
        out[path] = False if path.endswith("round_to_auto") else default
    return out


# What a request may carry, checked before any work: an unbounded string
# would travel on into worker payloads, log lines, paths and error messages.
# Strings are bounded by field name (every message), others by DEFAULT_TEXT_CHARS;
# repeated fields by count. Keep these in step with the contract's comments.
MAX_URI_CHARS = 4096  # PATH_MAX on Linux; far beyond any real gs:// object name
DEFAULT_TEXT_CHARS = 256  # names, request_id, feature keys, one excluded layer name
STRING_LIMITS = {
    "model_uri": MAX_URI_CHARS,
    "output_uri": MAX_URI_CHARS,
    "train_data": MAX_URI_CHARS,
    "eval_data": MAX_URI_CHARS,
    "page_token": 1024,
}
REPEATED_LIMITS = {"ratios": MAX_RATIOS, "exclude": 1024}


def check_sizes(request: Message) -> None:
    """Refuse a contract message with an over-long string or repeated field.

    Raises:
        ServiceError: INVALID_ARGUMENT stating the limit, with one violation
            per offending field (``spec.pruning.exclude[3]``).
    """
    if not request.DESCRIPTOR.full_name.startswith("secateur."):
        return
    violations = list(_size_violations(request, ""))
    if violations:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, violations[0][1], violations)


def _size_violations(msg: Message, prefix: str) -> Iterator[tuple[str, str]]:
    for fd, value in msg.ListFields():
        path = prefix + fd.name
        repeated = fd.is_repeated
        items = list(value) if repeated else [value]
        limit = REPEATED_LIMITS.get(fd.name)
        if repeated and limit is not None and len(items) > limit:
            yield path, (f"{path} may hold at most {limit} entries. Received: {len(items)} entries")
            continue
        for i, item in enumerate(items):
            where = f"{path}[{i}]" if repeated else path
            if fd.type == fd.TYPE_MESSAGE:
                yield from _size_violations(item, where + ".")
            elif fd.type in (fd.TYPE_STRING, fd.TYPE_BYTES):
                most = STRING_LIMITS.get(fd.name, DEFAULT_TEXT_CHARS)
                if len(item) > most:
                    yield (
                        where,
                        (
                            f"{where} must be at most {most} characters. "
                            f"Received: {len(item)} characters"
                        ),
                    )


def field_path(name: str) -> str:
    """The request path of a library field name (``learning_rate`` -> ``spec.training...``).

    A name that already is a path (``spec....``) comes back as it is.
    """
    if name.startswith("spec."):
        return name
    return _FIELD_PATHS.get(name, f"spec.{name}")


def invalid(field: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, [(field, message)])


def enum_choice(enum: Any, number: int, field: str) -> str | None:
    """The library name of a Criterion/Scope number (``l1``); None for UNSPECIFIED.

    Raises:
        InvalidSpecError: a number the contract does not define (proto3 takes any).
    """
    if number == 0:
        return None
    try:
        return enums.short_name(enum, number).lower()
    except ValueError:
        names = ", ".join(n.lower() for n in enums.short_names(enum))
        raise InvalidSpecError(
            f"{field} must be one of {names}. Received: {field}={number}", field
        ) from None


def _choices(enum: Any, numbers: Any, field: str) -> Iterator[str]:
    """The library names of a repeated enum field's values (UNSPECIFIED refused)."""
    for i, number in enumerate(numbers):
        name = enum_choice(enum, number, field)
        if name is None:
            names = ", ".join(n.lower() for n in enums.short_names(enum))
            raise InvalidSpecError(
                f"{field}[{i}] must be one of {names}. Received: {enum.Name(0)}", field
            )
        yield name


def prune_spec(p: pb.PruningSpec) -> PruneSpec:
    """The library's PruneSpec of a PruningSpec: set fields only, defaults otherwise.

    Raises:
        InvalidSpecError: a value the library refuses (the field named).
    """
    kwargs: dict[str, Any] = {
        name: getattr(p, name)
        for name in (
            "ratio",
            "min_channels",
            "reload_weights",
            "seed",
            "bias_compensation",
            "taylor_batches",
            "iterative_steps",
            "iterative_schedule",
            "head_ratio",
        )
        if p.HasField(name)
    }
    for name, enum in (("criterion", pb.Criterion), ("scope", pb.Scope)):
        choice = enum_choice(enum, getattr(p, name), name)
        if choice is not None:
            kwargs[name] = choice
    rounding = p.WhichOneof("rounding")
    if rounding == "round_to":
        kwargs["round_to"] = p.round_to
    elif rounding == "round_to_auto" and p.round_to_auto:
        kwargs["round_to"] = "auto"
    if p.exclude:
        kwargs["exclude"] = tuple(p.exclude)
    if p.HasField("targets"):
        t = p.targets
        kwargs["targets"] = Targets(**{f.name: v for f, v in t.ListFields()})
    return PruneSpec(**kwargs)


def _present(msg: Message, names: Mapping[str, str]) -> dict[str, Any]:
    """``{library name: value}`` of the fields of ``msg`` that were set."""
    return {lib: getattr(msg, name) for name, lib in names.items() if msg.HasField(name)}


def job_request(spec: pb.JobSpec) -> JobRequest:
    """Validate a JobSpec into the pipeline's request: the one conversion and check.

    ``secateur prune`` (local) and the service both call this; unset fields
    take the library dataclasses' defaults.

    Raises:
        ServiceError: INVALID_ARGUMENT with the offending field's path.
    """
    for name in ("model_uri", "output_uri"):
        if not getattr(spec, name).strip():
            raise invalid(f"spec.{name}", f"{name} is required. Received: an empty string")
    t = spec.training
    try:
        measure = _present(t, {"measure_steps": "steps"})
        return JobRequest(
            model_uri=spec.model_uri,
            output_uri=spec.output_uri,
            spec=prune_spec(spec.pruning),
            ratios=tuple(spec.pruning.ratios),
            train=TrainConfig(
                **_present(t, {n: n for n in ("epochs", "batch_size", "learning_rate")}),
                **_present(
                    t,
                    {n: n for n in ("steps_per_execution", "mixed_precision", "deterministic")},
                ),
                **_present(t, {n: n for n in ("sparsity_epochs", "sparsity_lambda")}),
                **_present(t, {n: n for n in ("distill_alpha", "distill_temperature")}),
                **_present(t, {"bn_recalibration_batches": "bn_recalibration_batches"}),
            ),
            train_data=t.train_data or None,
            eval_data=t.eval_data or None,
            data=DataSpec(
                **_present(t, {n: n for n in ("image_key", "label_key", "resize", "cache_mib")})
            ),
            max_accuracy_drop=(
                spec.max_accuracy_drop if spec.HasField("max_accuracy_drop") else None
            ),
            measure=MeasureConfig(**measure),
            version=spec.version if spec.HasField("version") else None,
            max_run_seconds=(spec.max_run_seconds if spec.HasField("max_run_seconds") else None),
            exports=tuple(_choices(pb.ExportFormat, spec.exports, "exports")),
        )
    except InvalidSpecError as exc:
        raise invalid(field_path(exc.field), str(exc)) from exc


def to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    # JSON round trip turns tuples, numpy scalars and None into Struct values.
    out.update(json.loads(json.dumps(data, default=_jsonable)))
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# Every scalar figure of the contract's Metrics (``how`` is a Struct, set apart).
_METRIC_FIELDS = tuple(f.name for f in pb.Metrics.DESCRIPTOR.fields if f.name != "how")


def metrics(figures: Mapping[str, Any] | None) -> pb.Metrics | None:
    if not figures:
        return None
    m = pb.Metrics(**{k: figures[k] for k in _METRIC_FIELDS if figures.get(k) is not None})
    m.how.CopyFrom(to_struct(figures.get("how") or {}))
    return m


def job_result(report: Mapping[str, Any]) -> pb.JobResult:
    """The JobResult message of a pipeline report."""
    result = pb.JobResult(
        output_uri=report.get("output_uri") or "", decision=report.get("decision") or ""
    )
    for key in ("original", "pruned"):
        m = metrics(report.get(key))
        if m is not None:
            getattr(result, key).CopyFrom(m)
    if report.get("plan"):
        result.plan.CopyFrom(to_struct(report["plan"]))
    if report.get("outcome"):
        result.outcome = enums.from_short_name(pb.JobResult.Outcome, report["outcome"])  # type: ignore[assignment]
    for key in ("selected_ratio", "max_accuracy_drop", "best_ratio", "best_accuracy_drop"):
        if report.get(key) is not None:
            setattr(result, key, float(report[key]))
    for t in report.get("targets") or []:
        target = result.targets.add(
            metric=t["metric"],
            wanted=float(t["wanted"]),
            wanted_absolute=bool(t.get("wanted_absolute")),
            measured=float(t["measured"]),
            met=bool(t["met"]),
        )
        for key in ("predicted", "remeasured"):
            if t.get(key) is not None:
                setattr(target, key, float(t[key]))
        target.how.CopyFrom(to_struct(t.get("how") or {}))
    for e in report.get("exports") or []:
        result.exports.add(
            format=enums.from_short_name(pb.ExportFormat, e["format"]),  # type: ignore[arg-type]
            file=e["file"],
            size_bytes=e["bytes"],
            samples=e["samples"],
            max_abs_diff=e["max_abs_diff"],
        ).how.CopyFrom(to_struct({k: e[k] for k in ("exporter", "runtime", "atol", "rtol")}))
    for c in report.get("candidates", []):
        cand = result.candidates.add(ratio=c["ratio"])
        m = metrics(c.get("figures"))
        if m is not None:
            cand.metrics.CopyFrom(m)
        if c.get("accuracy_drop") is not None:
            cand.accuracy_drop = float(c["accuracy_drop"])
        cand.plan.CopyFrom(to_struct(c.get("plan") or {}))
    resumed = report.get("resumed") or {}
    result.resumed = int(resumed.get("times") or 0)
    result.resumed_from.extend(str(r.get("text", "")) for r in resumed.get("from") or [])
    return result


def plan_response(plan: Mapping[str, Any]) -> pb.PlanPruningResponse:
    resp = pb.PlanPruningResponse(
        params_before=plan["params_before"],
        params_after=plan["params_after"],
        flops_before=plan["flops_before"],
        flops_after=plan["flops_after"],
    )
    resp.plan.CopyFrom(to_struct(plan))
    for g in plan["groups"]:
        resp.groups.add(
            id=g["id"],
            origins=g["origins"],
            size_before=g["size_before"],
            size_after=g["size_after"],
            criterion=g.get("criterion") or "",
            frozen_reasons=g.get("frozen") or [],
            kind=g.get("kind") or "channels",
        )
    return resp
