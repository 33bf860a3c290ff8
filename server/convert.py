"""Messages <-> domain objects. No TensorFlow: the service validates with these.

Field violations name proto paths (``spec.pruning.ratio``) so a client can
point at what it sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from secateur.pruner.config import MeasureConfig, TrainConfig
from secateur.pruner.data import DataSpec
from secateur.pruner.errors import InvalidSpecError
from secateur.pruner.spec import PruneSpec
from secateur.server.errors import ServiceError
from secateur.server.pipeline import MAX_RATIOS, JobRequest
from secateur.v1 import pruning_pb2 as pb

CRITERIA = {
    pb.CRITERION_UNSPECIFIED: "bn_scale",
    pb.BN_SCALE: "bn_scale",
    pb.L1: "l1",
    pb.L2: "l2",
    pb.RANDOM: "random",
}
SCOPES = {pb.SCOPE_UNSPECIFIED: "global", pb.GLOBAL: "global", pb.LAYERWISE: "layerwise"}
_FIELD_PATHS = {
    "model_uri": "spec.model_uri",
    "output_uri": "spec.output_uri",
    "ratio": "spec.pruning.ratio",
    "ratios": "spec.pruning.ratios",
    "criterion": "spec.pruning.criterion",
    "scope": "spec.pruning.scope",
    "round_to": "spec.pruning.round_to",
    "min_channels": "spec.pruning.min_channels",
    "exclude": "spec.pruning.exclude",
    "seed": "spec.pruning.seed",
    "epochs": "spec.training.epochs",
    "batch_size": "spec.training.batch_size",
    "learning_rate": "spec.training.learning_rate",
    "steps": "spec.training.measure_steps",
    "eval_data": "spec.training.eval_data",
    "max_accuracy_drop": "spec.max_accuracy_drop",
    "version": "spec.version",
}


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
    """The request path of a library field name (``learning_rate`` -> ``spec.training...``)."""
    return _FIELD_PATHS.get(name, f"spec.{name}")


def invalid(field: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, [(field, message)])


def prune_spec(p: pb.PruningSpec, ratio: float | None = None) -> PruneSpec:
    if p.criterion not in CRITERIA:
        raise InvalidSpecError(f"unknown criterion enum. Received: {p.criterion}", "criterion")
    if p.scope not in SCOPES:
        raise InvalidSpecError(f"unknown scope enum. Received: {p.scope}", "scope")
    return PruneSpec(
        ratio=p.ratio if ratio is None else ratio,
        criterion=CRITERIA[p.criterion],
        scope=SCOPES[p.scope],
        round_to="auto" if p.round_to_auto else (p.round_to or 1),
        min_channels=p.min_channels or 1,
        exclude=tuple(p.exclude),
        reload_weights=not p.no_reload,
        seed=int(p.seed),
    )


def job_request(spec: pb.JobSpec) -> JobRequest:
    """Validate a JobSpec into the pipeline's request.

    Raises:
        ServiceError: INVALID_ARGUMENT with the offending field's path.
    """
    for name in ("model_uri", "output_uri"):
        if not getattr(spec, name).strip():
            raise invalid(f"spec.{name}", f"{name} is required. Received: an empty string")
    t = spec.training
    try:
        return JobRequest(
            model_uri=spec.model_uri,
            output_uri=spec.output_uri,
            spec=prune_spec(spec.pruning),
            ratios=tuple(spec.pruning.ratios),
            train=TrainConfig(
                epochs=t.epochs,
                batch_size=t.batch_size or 128,
                learning_rate=t.learning_rate or 0.01,
            ),
            train_data=t.train_data or None,
            eval_data=t.eval_data or None,
            data=DataSpec(
                image_key=t.image_key or "image", label_key=t.label_key or "label", resize=t.resize
            ),
            max_accuracy_drop=spec.max_accuracy_drop
            if spec.HasField("max_accuracy_drop")
            else None,
            measure=MeasureConfig(steps=t.measure_steps) if t.measure_steps else MeasureConfig(),
            version=spec.version or None,
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
    if report.get("selected_ratio") is not None:
        result.selected_ratio = float(report["selected_ratio"])
    for c in report.get("candidates", []):
        cand = result.candidates.add(ratio=c["ratio"])
        m = metrics(c.get("figures"))
        if m is not None:
            cand.metrics.CopyFrom(m)
        if c.get("accuracy_drop") is not None:
            cand.accuracy_drop = float(c["accuracy_drop"])
        cand.plan.CopyFrom(to_struct(c.get("plan") or {}))
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
        )
    return resp


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(s)
