"""Job settings as plain frozen dataclasses (no TensorFlow import).

The service validates requests with these without loading TensorFlow; the
modules that run them (:mod:`finetune`, :mod:`measure`) import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from secateur.pruner.errors import InvalidSpecError


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters (the study's defaults).

    Raises:
        InvalidSpecError: a non-positive epoch count, batch or learning rate.
    """

    epochs: int = 1
    batch_size: int = 128
    learning_rate: float = 0.01
    momentum: float = 0.9
    jit_compile: bool | str = "auto"
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name == "epochs" else 1)
            ):
                raise InvalidSpecError(
                    f"{name} must be a positive integer. Received: {name}={value!r}", name
                )
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise InvalidSpecError(
                f"learning_rate must be > 0. Received: learning_rate={self.learning_rate!r}",
                "learning_rate",
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
        for name in ("steps", "rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidSpecError(
                    f"{name} must be a positive integer. Received: {name}={value!r}", name
                )
