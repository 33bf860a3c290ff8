"""The contract's enum values by their short names (``SUCCEEDED`` for ``STATE_SUCCEEDED``).

buf's lint rules want every enum value prefixed with its enum's name; people
(and the ``stage`` label of the metrics) read them without it. This is the one
place that strips and adds the prefixes; protobuf only.
"""

from __future__ import annotations

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from secateur.v1 import pruning_pb2 as pb

_PREFIX = {
    "State": "STATE_",
    "Stage": "STAGE_",
    "Criterion": "CRITERION_",
    "Scope": "SCOPE_",
    "Outcome": "OUTCOME_",
    "ExportFormat": "EXPORT_FORMAT_",
}


def _prefix(enum: EnumTypeWrapper) -> str:
    return _PREFIX[enum.DESCRIPTOR.name]


def short_names(enum: EnumTypeWrapper) -> tuple[str, ...]:
    """Every value's short name but the ``*_UNSPECIFIED`` zero, in number order."""
    prefix = _prefix(enum)
    return tuple(v.name.removeprefix(prefix) for v in enum.DESCRIPTOR.values if v.number != 0)


def short_name(enum: EnumTypeWrapper, number: int) -> str:
    """``SUCCEEDED`` for ``STATE_SUCCEEDED``; the full name for the zero value.

    Raises:
        ValueError: no value has this number.
    """
    name = enum.Name(number)
    return name if number == 0 else name.removeprefix(_prefix(enum))


def from_short_name(enum: EnumTypeWrapper, name: str) -> int:
    """The number of a value named short (``succeeded``, any case) or in full.

    Raises:
        ValueError: no such value; the message lists the short names.
    """
    key = name.strip().upper()
    prefix = _prefix(enum)
    for candidate in (prefix + key, key):
        if candidate in enum.DESCRIPTOR.values_by_name and enum.Value(candidate) != 0:
            return enum.Value(candidate)
    raise ValueError(
        f"{enum.DESCRIPTOR.name.lower()} must be one of {', '.join(short_names(enum))}. "
        f"Received: {name!r}"
    )


#: The pipeline's stages in order (``FETCHING`` ... ``EXPORTING``).
STAGES: tuple[str, ...] = short_names(pb.Job.Stage)
#: Job states (``QUEUED`` ... ``CANCELLED``).
STATES: tuple[str, ...] = short_names(pb.Job.State)
#: What a job did with its candidates (``PUBLISHED``, ``GATE_FAILED``, ...).
OUTCOMES: tuple[str, ...] = short_names(pb.JobResult.Outcome)


def stage_number(stage: str) -> int:
    """``Job.STAGE_FINE_TUNING`` for ``FINE_TUNING``; 0 for anything else."""
    return pb.Job.Stage.Value("STAGE_" + stage) if stage in STAGES else 0
