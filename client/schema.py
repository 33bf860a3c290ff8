"""The job request schema, derived from the contract's ``JobSpec``.

One table, :data:`SPEC_FIELDS`, walks the ``JobSpec`` descriptor: every
leaf field (``pruning.ratio``, ``training.epochs``, ``max_accuracy_drop``
...) is a spec-file key (its proto field name, flat), a CLI flag
(``--ratio``), a type and a help text. The ``secateur`` command builds its
flags from it, spec files are read through it, and
:func:`job_spec_from_options` turns either into the one ``JobSpec`` that
``secateur submit`` sends and ``secateur prune`` converts locally with the
server's own conversion (``secateur.server.pipeline.convert.job_request``), where
ranges are checked and unset fields take the library's defaults.

Imports protobuf only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from secateur.v1 import enums, pruning_pb2

# Help of every schema field (a test keeps these keys and SPEC_FIELDS equal).
HELP: dict[str, str] = {
    "ratio": "fraction of prunable channels to remove, in [0, 1)",
    "ratios": "sweep: ratios separated by commas, one candidate each (overrides ratio)",
    "criterion": "channel importance criterion",
    "scope": "global ranks all channels together; layerwise prunes every group alike",
    "round_to": "kept channel counts are multiples of N ('auto': the device's layout multiple)",
    "round_to_auto": "round kept channel counts to the attached device's layout multiple",
    "min_channels": "no group keeps fewer channels than this",
    "exclude": "layer name whose channels must not change (repeatable)",
    "reload_weights": "copy the kept slices of the original weights (no: fresh initialisation)",
    "seed": "the job's seed: random criterion, initialisation, shuffle, Dropout, every generator",
    "bias_compensation": "fold the constant output of removed channels into the next bias",
    "taylor_batches": "training batches the taylor criterion reads to score channels",
    "epochs": "fine-tuning epochs per candidate (needs train_data)",
    "batch_size": "fine-tuning and measurement batch size",
    "learning_rate": "SGD learning rate (momentum 0.9)",
    "train_data": "TFRecord path, glob or gs:// pattern for fine-tuning",
    "eval_data": "TFRecord path, glob or gs:// pattern for accuracy",
    "image_key": "tf.train.Example key of the image",
    "label_key": "tf.train.Example key of the label",
    "resize": "resize images to the model's input size",
    "measure_steps": "timed training steps per measurement round",
    "steps_per_execution": "training steps per compiled execution (progress once per execution)",
    "mixed_precision": "auto, off, mixed_float16 or mixed_bfloat16 while fine-tuning",
    "cache_mib": "cache decoded data in memory when it fits this many MiB (0: never)",
    "sparsity_epochs": "epochs of L1 sparsity training on BatchNorm gammas before scoring",
    "bn_recalibration_batches": "after fine-tuning, re-estimate BatchNorm statistics from this "
    "many training batches (0: off)",
    "sparsity_lambda": "weight of the L1 penalty on BatchNorm gammas in sparsity training",
    "iterative_steps": "reach the ratio in this many prune + fine-tune rounds (1: one shot)",
    "iterative_schedule": "cumulative share removed per round: linear or geometric",
    "head_ratio": "fraction of attention heads to remove, in [0, 1), apart from channels",
    "distill_alpha": "weight of distillation from the original while fine-tuning (0: off)",
    "distill_temperature": "softmax temperature of the distillation term",
    "deterministic": "op determinism: same job twice, same weights (no: faster, may differ)",
    "target_step_time": "prune to this training step time, as a fraction of the original's "
    "(measured on the device; instead of ratio)",
    "target_latency": "prune to this inference latency at --target-latency-batch, as a fraction",
    "target_latency_ms": "prune to this inference latency at --target-latency-batch, in ms",
    "target_latency_batch": "batch size the latency target is measured at (default 1)",
    "target_peak_memory": "prune to this peak training memory, as a fraction of the original's",
    "target_params": "prune to this parameter count, as a fraction (met exactly)",
    "target_max_params": "prune to at most this many parameters (met exactly)",
    "target_flops": "prune to this FLOPs per example, as a fraction (met exactly)",
    "target_max_flops": "prune to at most this many FLOPs per example (met exactly)",
    "target_tolerance": "a measured target counts as met up to this relative excess (noise)",
    "target_corrections": "measure-and-correct rounds after the first allocation",
    "target_max_group_ratio": "under a target, no group loses more than this fraction of its "
    "channels (default 0.5)",
    "max_accuracy_drop": "publish the largest ratio whose accuracy drop is within this (0.02)",
    "version": "TF Serving version to publish (default: the next free one)",
    "exports": "extra artifacts checked against the pruned model, published in the version "
    "(litert, onnx; comma-separated or repeated; see docs/exports.md)",
    "max_run_seconds": "service only: stop the job past this many seconds (FAILED "
    "DEADLINE_EXCEEDED; default and maximum: the server's --max-job-seconds)",
}
# The default each unset field takes, by proto path: the library's, as the
# service applies them (secateur.server.pipeline.convert.defaults(); a test keeps
# the two equal). Here so that the client's --help states them without the server.
DEFAULTS: dict[str, Any] = {
    "pruning.ratio": 0.3,
    "pruning.ratios": (),
    "pruning.criterion": "bn_scale",
    "pruning.scope": "global",
    "pruning.round_to": 1,
    "pruning.round_to_auto": False,
    "pruning.min_channels": 1,
    "pruning.exclude": (),
    "pruning.reload_weights": True,
    "pruning.seed": 0,
    "pruning.bias_compensation": True,
    "pruning.taylor_batches": 8,
    "pruning.iterative_steps": 1,
    "pruning.iterative_schedule": "linear",
    "pruning.head_ratio": 0.0,
    "pruning.targets.step_time": None,
    "pruning.targets.latency": None,
    "pruning.targets.latency_ms": None,
    "pruning.targets.latency_batch": 1,
    "pruning.targets.peak_memory": None,
    "pruning.targets.params": None,
    "pruning.targets.max_params": None,
    "pruning.targets.flops": None,
    "pruning.targets.max_flops": None,
    "pruning.targets.tolerance": 0.02,
    "pruning.targets.corrections": 3,
    "pruning.targets.max_group_ratio": 0.5,
    "training.epochs": 1,
    "training.batch_size": 128,
    "training.learning_rate": 0.01,
    "training.train_data": None,
    "training.eval_data": None,
    "training.image_key": "image",
    "training.label_key": "label",
    "training.resize": False,
    "training.measure_steps": 10,
    "training.deterministic": True,
    "training.steps_per_execution": "auto",
    "training.mixed_precision": "auto",
    "training.cache_mib": 256,
    "training.sparsity_epochs": 0,
    "training.bn_recalibration_batches": 16,
    "training.sparsity_lambda": 0.0001,
    "training.distill_alpha": 0.0,
    "training.distill_temperature": 4.0,
    "max_accuracy_drop": None,
    "version": None,
    "max_run_seconds": None,
    "exports": (),
}
_POSITIONAL = ("model_uri", "output_uri")
_KINDS: dict[int, type] = {
    FieldDescriptor.TYPE_DOUBLE: float,
    FieldDescriptor.TYPE_FLOAT: float,
    FieldDescriptor.TYPE_INT32: int,
    FieldDescriptor.TYPE_INT64: int,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_ENUM: str,
}


@dataclass(frozen=True)
class SpecField:
    """One leaf field of ``JobSpec``.

    Attributes:
        key: spec-file key and flag name (``--`` + key with dashes).
        path: proto path under ``JobSpec`` (``pruning.ratio``); the service's
            field violations name it as ``spec.`` + path.
        kind: the Python type of one value (enums: their names, as str).
        repeated: a list of values.
        choices: an enum's value names, lower case, without prefix.
        enum: the enum's name in the contract (``Criterion``), or "".
        help: one line.
    """

    key: str
    path: str
    kind: type
    repeated: bool = False
    choices: tuple[str, ...] = ()
    enum: str = ""
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


# Messages whose fields' keys carry a prefix (``targets.step_time`` is
# ``target_step_time``, ``--target-step-time``): their names alone say too little.
_KEY_PREFIXES = {"targets": "target_"}


def _leaves(desc: Descriptor, prefix: str = "", key_prefix: str = "") -> Iterator[SpecField]:
    for fd in desc.fields:
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            inner = key_prefix + _KEY_PREFIXES.get(fd.name, "")
            yield from _leaves(fd.message_type, f"{prefix}{fd.name}.", inner)
            continue
        if not prefix and fd.name in _POSITIONAL:
            continue
        choices: tuple[str, ...] = ()
        enum = fd.enum_type.name if fd.enum_type is not None else ""
        if enum:
            choices = tuple(n.lower() for n in enums.short_names(getattr(pruning_pb2, enum)))
        yield SpecField(
            key=key_prefix + fd.name,
            path=prefix + fd.name,
            kind=_KINDS[fd.type],
            repeated=fd.is_repeated,
            choices=choices,
            enum=enum,
            help=HELP.get(key_prefix + fd.name, ""),
        )


#: Every field a job request can set, in the contract's order.
SPEC_FIELDS: tuple[SpecField, ...] = tuple(_leaves(pruning_pb2.JobSpec.DESCRIPTOR))
FIELDS_BY_KEY: dict[str, SpecField] = {f.key: f for f in SPEC_FIELDS}
KNOWN_OPTIONS = frozenset(FIELDS_BY_KEY)
assert len(FIELDS_BY_KEY) == len(SPEC_FIELDS), "JobSpec leaf field names must be unique"


def _scalar(f: SpecField, value: Any) -> Any:
    """``value`` as ``f.kind``; a ValueError naming the field otherwise."""
    name = f.key
    if f.kind is str and not f.choices:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string. Received: {name}={value!r}")
        return value
    if f.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false. Received: {name}={value!r}")
        return value
    if f.choices:
        if not isinstance(value, str) or value.lower() not in f.choices:
            raise ValueError(
                f"{name} must be one of {', '.join(f.choices)}. Received: {name}={value!r}"
            )
        return enums.from_short_name(getattr(pruning_pb2, f.enum), value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number. Received: {name}={value!r}")
    if f.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer. Received: {name}={value!r}")
        return int(value)
    return float(value)


def _values(f: SpecField, value: Any) -> list[Any]:
    """A repeated field's values: a list, or a comma-separated string (ratios, enums)."""
    if f.choices:  # enum names: a list, comma-separated, or both (--exports litert,onnx)
        parts = value if isinstance(value, list | tuple) else [value]
        names = [t for p in parts for t in (p.split(",") if isinstance(p, str) else [p])]
        kept = [t.strip() if isinstance(t, str) else t for t in names]
        return [_scalar(f, t) for t in kept if t != ""]
    if isinstance(value, str):
        items: list[Any] = [value] if f.kind is str else value.split(",")
        if f.kind is float:
            try:
                items = [float(t) for t in items if t.strip()]
            except ValueError:
                raise ValueError(
                    f"{f.key} must be numbers separated by commas. Received: {f.key}={value!r}"
                ) from None
        return [_scalar(f, v) for v in items]
    if not isinstance(value, list | tuple):
        raise ValueError(f"{f.key} must be a list. Received: {f.key}={value!r}")
    return [_scalar(f, v) for v in value]


def _rounding(given: dict[str, Any]) -> None:
    """``round_to: auto`` is ``round_to_auto: true``; both at once is refused."""
    auto = given.get("round_to_auto")
    if "round_to" in given and auto is not None and auto is not False:
        raise ValueError(
            "round_to and round_to_auto are exclusive: give one. "
            f"Received: round_to={given['round_to']!r}, round_to_auto={auto!r}"
        )
    if isinstance(given.get("round_to"), str) and given["round_to"].strip().lower() == "auto":
        given.pop("round_to")
        given["round_to_auto"] = True
    elif auto is False:
        given.pop("round_to_auto")  # not auto: the default rounding, or round_to


def _target(spec: pruning_pb2.JobSpec, path: str) -> tuple[Message, str]:
    *parents, leaf = path.split(".")
    msg: Message = spec
    for name in parents:
        msg = getattr(msg, name)
    return msg, leaf


def job_spec_from_options(
    model_uri: str, output_uri: str, opts: Mapping[str, Any]
) -> pruning_pb2.JobSpec:
    """The ``JobSpec`` of flat options (spec-file keys; None = not given).

    Only given options are set; everything else stays unset, which the
    conversion reads as the library default.

    Raises:
        ValueError: an unknown key, a value of the wrong type or out of the
            choices, or ambiguous rounding, naming the field and the value
            received. Ranges (ratio in [0, 1), ...) are checked by the one
            conversion (the server's, also run by ``secateur prune``).
    """
    unknown = sorted(set(opts) - KNOWN_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s); known: {sorted(KNOWN_OPTIONS)}. Received: {unknown}")
    spec = pruning_pb2.JobSpec(model_uri=model_uri, output_uri=output_uri)
    given = {k: v for k, v in opts.items() if v is not None}
    _rounding(given)
    for key, value in given.items():
        f = FIELDS_BY_KEY[key]
        msg, leaf = _target(spec, f.path)
        if f.repeated:
            getattr(msg, leaf).extend(_values(f, value))
        else:
            setattr(msg, leaf, _scalar(f, value))
    return spec


def options_from_job_spec(spec: pruning_pb2.JobSpec) -> dict[str, Any]:
    """The flat options a ``JobSpec`` sets (the inverse of :func:`job_spec_from_options`)."""
    out: dict[str, Any] = {}
    for f in SPEC_FIELDS:
        msg, leaf = _target(spec, f.path)
        if f.repeated:
            if getattr(msg, leaf):
                out[f.key] = [
                    enums.short_name(getattr(pruning_pb2, f.enum), v).lower() if f.choices else v
                    for v in getattr(msg, leaf)
                ]
        elif msg.HasField(leaf) if _has_presence(msg, leaf) else getattr(msg, leaf):
            value = getattr(msg, leaf)
            if f.choices:
                value = enums.short_name(getattr(pruning_pb2, f.enum), value).lower()
            out[f.key] = value
    return out


def _has_presence(msg: Message, leaf: str) -> bool:
    return bool(msg.DESCRIPTOR.fields_by_name[leaf].has_presence)
