"""Job settings as plain frozen dataclasses (no TensorFlow import).

The service validates requests with these without loading TensorFlow; the
modules that run them (:mod:`finetune`, :mod:`measure`) import them from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from secateur.pruner.errors import InvalidSpecError

# Upper bounds well beyond any sensible job; they stop a typo (or a hostile
# request) from asking for a billion epochs or a 2**31 batch.
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_LEARNING_RATE = 10.0
MAX_STEPS = 100_000
MAX_ROUNDS = 100
#: An L1 weight on BatchNorm gammas beyond this swamps any task loss.
MAX_SPARSITY_LAMBDA = 1.0
#: ``TrainConfig.mixed_precision`` values: "auto" picks per device, "off" is float32.
MIXED_PRECISION = ("auto", "off", "mixed_float16", "mixed_bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters (the study's defaults).

    Raises:
        InvalidSpecError: a value out of range (see the ``MAX_*`` bounds), a
            learning rate that is not a finite number in (0, 10].
    """

    epochs: int = 1
    batch_size: int = 128
    learning_rate: float = 0.01
    momentum: float = 0.9
    jit_compile: bool | str = "auto"
    steps_per_epoch: int | None = None
    #: Op determinism (the same job twice gives the same weights); False trades
    #: that for speed. Every generator is seeded from the job's seed either way.
    deterministic: bool = True
    #: Training steps per compiled execution; "auto" resolves per device
    #: (:func:`secateur.pruner.finetune.resolve_steps_per_execution`).
    steps_per_execution: int | str = "auto"
    #: Keras mixed precision while fine-tuning: "auto", "off" or a policy.
    mixed_precision: str = "auto"
    #: Sparsity training before scoring (Network Slimming): epochs with an L1
    #: penalty ``sparsity_lambda * sum|gamma|`` on prunable BatchNorm scales.
    sparsity_epochs: int = 0
    sparsity_lambda: float = 1e-4
    #: Distillation from the original while fine-tuning: the weight of the
    #: soft-target loss (0: off, labels only) and its softmax temperature.
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0
    #: After fine-tuning, BatchNorm moving statistics are re-estimated from
    #: this many training batches (0: off). A short fine-tune leaves them far
    #: from the pruned network's activations (momentum 0.99 moves them about
    #: a fifth of the way in 24 steps).
    bn_recalibration_batches: int = 16

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 0, MAX_EPOCHS)
        check_int("sparsity_epochs", self.sparsity_epochs, 0, MAX_EPOCHS)
        check_float("sparsity_lambda", self.sparsity_lambda, 0.0, MAX_SPARSITY_LAMBDA)
        check_float("distill_alpha", self.distill_alpha, 0.0, 1.0)
        check_float("distill_temperature", self.distill_temperature, 0.0, 100.0, low_open=True)
        check_int("bn_recalibration_batches", self.bn_recalibration_batches, 0, MAX_STEPS)
        if not isinstance(self.deterministic, bool):
            raise InvalidSpecError(
                f"deterministic must be true or false. Received: {self.deterministic!r}",
                "deterministic",
            )
        check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_float("learning_rate", self.learning_rate, 0.0, MAX_LEARNING_RATE, low_open=True)
        check_float("momentum", self.momentum, 0.0, 1.0, high_open=True)
        if self.steps_per_epoch is not None:
            check_int("steps_per_epoch", self.steps_per_epoch, 1, MAX_STEPS)
        if self.steps_per_execution != "auto":
            check_int("steps_per_execution", self.steps_per_execution, 1, MAX_STEPS)
        if self.mixed_precision not in MIXED_PRECISION:
            raise InvalidSpecError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}. "
                f"Received: mixed_precision={_shown(self.mixed_precision)}",
                "mixed_precision",
            )
        if self.jit_compile not in (True, False, "auto"):
            raise InvalidSpecError(
                f"jit_compile must be true, false or 'auto'. Received: {self.jit_compile!r}",
                "jit_compile",
            )


@dataclass(frozen=True)
class MeasureConfig:
    warmup_steps: int = 3
    steps: int = 10
    rounds: int = 2
    latency_runs: int = 20

    def __post_init__(self) -> None:
        check_int("warmup_steps", self.warmup_steps, 0, MAX_STEPS)
        check_int("steps", self.steps, 1, MAX_STEPS)
        check_int("rounds", self.rounds, 1, MAX_ROUNDS)
        check_int("latency_runs", self.latency_runs, 1, MAX_STEPS)


def check_int(name: str, value: Any, low: int, high: int) -> None:
    """Raise InvalidSpecError unless ``value`` is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidSpecError(
            f"{name} must be an integer in [{low}, {high}]. Received: {name}={_shown(value)}",
            name,
        )


def check_float(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise InvalidSpecError unless ``value`` is a finite number within the bounds.

    NaN and infinities are refused whatever the bounds (``nan > 0`` is False,
    but ``inf > 0`` is True: a range check alone lets infinity through).
    """
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (low < value if low_open else low <= value)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise InvalidSpecError(
            f"{name} must be a finite number in {interval}. Received: {name}={_shown(value)}",
            name,
        )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else f"{text[:100]}…({len(text) - 100} more chars)"
