"""Typed errors raised by the pruner library.

Callers (the service's error interceptor, the CLI) branch on these types,
never on message text::

    SecateurError
    ├── InvalidSpecError        a PruneSpec field is out of range or unknown
    ├── UnsupportedModelError   the model cannot be traced (subclassed, ...)
    ├── ModelLoadError          a model file is missing, unreadable or corrupt
    │   └── UnsafeModelError    loading it would run code from the file (Lambda, custom object)
    ├── DataError               training/eval data missing or not fitting the model
    ├── CancelledError          a long operation was cancelled by its caller
    ├── TargetUnreachableError  no pruning of the model meets a target (best reached attached)
    ├── ExportError             an asked-for LiteRT/ONNX artifact cannot be made or does not match
    └── PlanError               a plan cannot be applied to a model
        ├── PlanMismatchError   the plan was made for a different model
        └── EmptyGroupError     a plan would leave a group with no channels

Every message states the constraint and ends with what was received.
"""

from __future__ import annotations


class SecateurError(Exception):
    """Base class of every error the pruner raises on purpose."""


class InvalidSpecError(SecateurError, ValueError):
    """A pruning spec field is invalid.

    Attributes:
        field: the offending field name, for field-violation details.
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class UnsupportedModelError(SecateurError, TypeError):
    """The model cannot be analysed (not a functional/Sequential Keras model)."""


class ModelLoadError(SecateurError):
    """A model file or directory is missing, unreadable or corrupt."""


class UnsafeModelError(ModelLoadError):
    """Loading the model would run code the file carries.

    A ``Lambda`` layer, a serialised Python function or a custom (non-Keras)
    object; refused before any deserialisation (see ``secateur.pruner.safety``).

    Attributes:
        layer: the offending layer's path in the model (``outer/inner/evil``).
        class_name: the refused class (``Lambda``, a custom class name, ...).
    """

    def __init__(self, message: str, layer: str = "", class_name: str = "") -> None:
        super().__init__(message)
        self.layer = layer
        self.class_name = class_name


class DataError(SecateurError, ValueError):
    """Training or evaluation data is missing, malformed or does not fit the model.

    Attributes:
        file: the data file to blame, as the user named it ("" when none).
        record: the bad record's index in ``file``, counted from 0 (None when
            the file as a whole is to blame).
        field: the request field holding that data (``train_data`` or
            ``eval_data``), for field-violation details; "" when unknown.
    """

    def __init__(
        self, message: str, file: str = "", record: int | None = None, field: str = ""
    ) -> None:
        super().__init__(message)
        self.file, self.record, self.field = file, record, field


class CancelledError(SecateurError):
    """A long operation (fine-tuning, measuring) was cancelled by its caller."""


class TargetUnreachableError(SecateurError):
    """No allocation the pruner tried meets a target (``PruneSpec.targets``).

    Attributes:
        target: the metric that was missed (``step_time``, ``params`` ...).
        wanted: its limit as a fraction of the original's figure.
        best: the best fraction reached (measured, or counted for params/FLOPs).
        attempts: every allocation tried: predicted and measured figures.
    """

    def __init__(
        self,
        message: str,
        target: str = "",
        wanted: float | None = None,
        best: float | None = None,
        attempts: list[dict[str, object]] | None = None,
    ) -> None:
        super().__init__(message)
        self.target, self.wanted, self.best = target, wanted, best
        self.attempts = list(attempts or [])


class ExportError(SecateurError):
    """An extra artifact (LiteRT, ONNX) cannot be made from the model, or does not match it.

    Attributes:
        format: the format refused (``litert``, ``onnx``), "" when none applies.
        ops: the ops the format cannot take, when that is the reason.
    """

    def __init__(self, message: str, format: str = "", ops: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.format, self.ops = format, tuple(ops)


class PlanError(SecateurError, ValueError):
    """A pruning plan is malformed or cannot be applied."""


class PlanMismatchError(PlanError):
    """The plan does not describe the model it is applied to."""


class EmptyGroupError(PlanError):
    """Applying the plan would leave a channel group with zero channels."""
