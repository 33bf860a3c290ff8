"""Targets: prune until the model fits a budget, instead of by a ratio.

A :class:`Targets` names what the pruned model must fit, as a fraction of
the original's figure or as an absolute figure. ``params`` and ``flops`` are
counted from the plan (met exactly, no measurement); ``step_time``,
``latency`` and ``peak_memory`` are measured on the attached device (see
:mod:`secateur.pruner.budget`). No TensorFlow import: the service validates
requests with this module alone.

Each field maps onto one field of the service's ``JobSpec`` (fields with
presence: unset is None).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from secateur.pruner.config import MAX_BATCH_SIZE, check_float, check_int
from secateur.pruner.errors import InvalidSpecError

#: Figures measured on the device, and the ones counted from the plan.
MEASURED = ("step_time", "latency", "peak_memory")
COUNTED = ("params", "flops")
MAX_CORRECTIONS = 10


@dataclass(frozen=True)
class Target:
    """One resolved target: the metric and its limit relative to the original.

    Attributes:
        metric: ``step_time``, ``latency``, ``peak_memory``, ``params`` or ``flops``.
        fraction: the limit as a fraction of the original's figure, or None
            when it is absolute.
        absolute: the absolute limit (seconds, bytes, count), or None.
    """

    metric: str
    fraction: float | None
    absolute: float | None

    def limit(self, original: float) -> float:
        """The limit in the metric's unit, given the original model's figure."""
        return self.fraction * original if self.fraction is not None else float(self.absolute or 0)

    @property
    def measured(self) -> bool:
        return self.metric in MEASURED


@dataclass(frozen=True)
class Targets:
    """What the pruned model must fit; at least one field is set.

    Args:
        step_time: training step time as a fraction of the original's, in (0, 1].
        latency: inference latency at ``latency_batch`` as a fraction, in (0, 1].
        latency_ms: inference latency at ``latency_batch`` in milliseconds.
        latency_batch: the batch size latency is measured at.
        peak_memory: peak memory of a training step as a fraction, in (0, 1].
        params: parameter count as a fraction of the original's, in (0, 1].
        max_params: parameter count, absolute.
        flops: FLOPs per example as a fraction of the original's, in (0, 1].
        max_flops: FLOPs per example, absolute.
        tolerance: measured figures count as met up to this relative excess
            over the limit (measurement noise), in [0, 0.5].
        corrections: measure-and-correct rounds after the first allocation.
        max_group_ratio: the largest fraction of one group's channels the
            allocation may remove, in (0, 1]. A knapsack over (importance,
            cost) otherwise strips the costliest groups (the early
            full-resolution convolutions) to one channel: their scores say
            little about what losing the whole layer costs, and measured
            accuracy after fine-tuning fell far below the global ratio's.

    Raises:
        InvalidSpecError: a value out of range, no target at all, or a
            figure given both as a fraction and as an absolute limit.
    """

    step_time: float | None = None
    latency: float | None = None
    latency_ms: float | None = None
    latency_batch: int = 1
    peak_memory: float | None = None
    params: float | None = None
    max_params: int | None = None
    flops: float | None = None
    max_flops: int | None = None
    tolerance: float = 0.02
    corrections: int = 3
    max_group_ratio: float = 0.5

    def __post_init__(self) -> None:
        for name in ("step_time", "latency", "peak_memory", "params", "flops"):
            value = getattr(self, name)
            if value is not None:
                check_float(name, value, 0.0, 1.0, low_open=True)
        if self.latency_ms is not None:
            check_float("latency_ms", self.latency_ms, 0.0, math.inf, low_open=True)
        for name in ("max_params", "max_flops"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, 2**62)
        check_int("latency_batch", self.latency_batch, 1, MAX_BATCH_SIZE)
        check_float("tolerance", self.tolerance, 0.0, 0.5)
        check_int("corrections", self.corrections, 0, MAX_CORRECTIONS)
        check_float("max_group_ratio", self.max_group_ratio, 0.0, 1.0, low_open=True)
        for frac, absolute in (
            ("latency", "latency_ms"),
            ("params", "max_params"),
            ("flops", "max_flops"),
        ):
            if getattr(self, frac) is not None and getattr(self, absolute) is not None:
                raise InvalidSpecError(
                    f"give {frac} as a fraction or as {absolute}, not both. "
                    f"Received: {frac}={getattr(self, frac)}, {absolute}={getattr(self, absolute)}",
                    absolute,
                )
        if not self.resolved():
            raise InvalidSpecError(
                "targets must set at least one of step_time, latency, latency_ms, "
                "peak_memory, params, max_params, flops, max_flops. Received: none",
                "targets",
            )

    def resolved(self) -> list[Target]:
        """The targets set, in a fixed order (measured ones first)."""
        out = [
            Target("step_time", self.step_time, None),
            Target(
                "latency", self.latency, None if self.latency_ms is None else self.latency_ms / 1000
            ),
            Target("peak_memory", self.peak_memory, None),
            Target(
                "params", self.params, None if self.max_params is None else float(self.max_params)
            ),
            Target("flops", self.flops, None if self.max_flops is None else float(self.max_flops)),
        ]
        return [t for t in out if t.fraction is not None or t.absolute is not None]

    @property
    def measured(self) -> bool:
        """Whether any target needs the device (not only params/FLOPs)."""
        return any(t.measured for t in self.resolved())

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Targets:
        """Targets from plain data (JSON/YAML), rejecting unknown keys."""
        if not isinstance(data, Mapping):
            raise InvalidSpecError(
                f"targets must be a mapping of target names to limits. Received: {data!r}",
                "targets",
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidSpecError(
                f"unknown target(s); expected some of {sorted(known)}. Received: {unknown}",
                f"targets.{unknown[0]}",
            )
        return cls(**dict(data))
