"""Fine-tune a (pruned) model with the study's recipe.

SGD with momentum 0.9, learning rate 0.01, batch 128 by default. The
distribution strategy follows what is attached: TPUStrategy when a TPU
resolves, MirroredStrategy for GPUs, the default strategy otherwise. XLA is
used where it helps: always on TPU and GPU; on CPU it was measured slower
for these nets (DESIGN.md), so ``jit_compile="auto"`` leaves it off there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from secateur.pruner._keras import keras
from secateur.pruner.config import TrainConfig
from secateur.pruner.errors import CancelledError, DataError


@dataclass(frozen=True)
class Device:
    """What the job runs on and the strategy that drives it."""

    kind: str  # "TPU", "GPU" or "CPU"
    name: str
    count: int
    strategy: Any = field(repr=False, default=None)
    #: A multi-host member (pruner/cluster.py): only the chief evaluates,
    #: measures and publishes; ``members`` counts the hosts that train.
    is_chief: bool = True
    members: int = 1

    def use_xla(self, setting: bool | str) -> bool:
        return self.kind in ("TPU", "GPU") if setting == "auto" else bool(setting)


def select_device(
    tpu_resolver: Callable[[], Any] | None = None,
    list_gpus: Callable[[], list[Any]] | None = None,
    make_strategy: Callable[[str, Any], Any] | None = None,
) -> Device:
    """Choose the distribution strategy from what is attached.

    Args:
        tpu_resolver: returns a TPUClusterResolver or raises when no TPU
            (default: ``tf.distribute.cluster_resolver.TPUClusterResolver``).
        list_gpus: returns the visible GPUs (default: TensorFlow's list).
        make_strategy: builds a strategy from ("TPU"|"GPU"|"CPU", arg);
            injected by tests, real strategies otherwise.
    """
    import tensorflow as tf

    from secateur.pruner.cluster import current_member

    member = current_member()  # joined by ``secateur prune`` before TensorFlow started
    if member is not None and make_strategy is None:
        return _member_device(member)

    def default_strategy(kind: str, arg: Any) -> Any:
        if kind == "TPU":
            tf.config.experimental_connect_to_cluster(arg)
            tf.tpu.experimental.initialize_tpu_system(arg)
            return tf.distribute.TPUStrategy(arg)
        if kind == "GPU":
            return tf.distribute.MirroredStrategy()
        return tf.distribute.get_strategy()

    make = make_strategy or default_strategy
    resolve = tpu_resolver or (lambda: tf.distribute.cluster_resolver.TPUClusterResolver())
    try:
        resolver = resolve()
        return Device(
            "TPU", str(getattr(resolver, "master", lambda: "tpu")()), 1, make("TPU", resolver)
        )
    except (ValueError, RuntimeError, ImportError, tf.errors.NotFoundError):
        pass
    gpus = (list_gpus or (lambda: tf.config.list_physical_devices("GPU")))()
    if gpus:
        return Device("GPU", getattr(gpus[0], "name", "GPU:0"), len(gpus), make("GPU", gpus))
    return Device("CPU", "CPU:0", 1, make("CPU", None))


def outputs_probabilities(model: Any) -> bool:
    """True when the model ends in a softmax (probabilities), False for logits."""
    layer = model.outputs[0]._keras_history[0]
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def _member_device(member: Any) -> Device:
    """The Device of a cluster member (``cluster.Member``): its strategy spans the cluster."""
    import tensorflow as tf

    if member.kind == "TPU_SLICE":
        kind, name = "TPU", f"TPU slice, {member.members} hosts"
    else:
        kind = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        name = f"MultiWorkerMirrored, {member.members} workers"
    return Device(
        kind,
        name,
        int(member.strategy.num_replicas_in_sync),
        member.strategy,
        is_chief=member.is_chief,
        members=member.members,
    )


def compile_for_training(model: Any, config: TrainConfig, device: Device) -> None:
    """Compile with SGD(momentum) and the loss the model's output calls for."""
    # The optimizer's variables belong to the strategy the model was built under
    # (Keras 3 refuses to mix a multi-worker model with a default-scope optimizer).
    with model.distribute_strategy.scope():
        optimizer = keras.optimizers.SGD(
            learning_rate=config.learning_rate, momentum=config.momentum
        )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=not outputs_probabilities(model)
        ),
        metrics=["accuracy"],
        jit_compile=device.use_xla(config.jit_compile),
    )


def in_strategy(model: Any, device: Device) -> Any:
    """The model rebuilt under the device's strategy scope (same weights)."""
    import tensorflow as tf

    if device.strategy is None or device.strategy is tf.distribute.get_strategy():
        return model
    with device.strategy.scope():
        clone = model.__class__.from_config(model.get_config())
        clone.set_weights(model.get_weights())
    return clone


@dataclass(frozen=True)
class Progress:
    """A fine-tuning progress event."""

    epoch: int
    epochs: int
    step: int
    steps: int | None
    loss: float | None
    accuracy: float | None


class _Hooks(keras.callbacks.Callback):
    def __init__(
        self,
        epochs: int,
        steps: int | None,
        on_progress: Callable[[Progress], None] | None,
        should_cancel: Callable[[], bool] | None,
    ) -> None:
        super().__init__()
        self.epochs, self.steps = epochs, steps
        self.on_progress, self.should_cancel = on_progress, should_cancel
        self.epoch = 0
        self.cancelled = False

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        logs = logs or {}
        if self.on_progress:
            self.on_progress(
                Progress(
                    self.epoch + 1,
                    self.epochs,
                    batch + 1,
                    self.steps,
                    _num(logs.get("loss")),
                    _num(logs.get("accuracy")),
                )
            )
        if self.should_cancel and self.should_cancel():
            self.cancelled = True
            self.model.stop_training = True


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def finetune(
    model: Any,
    train_ds: Any,
    config: TrainConfig,
    device: Device,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[Any, dict[str, list[float]]]:
    """Train ``model`` on ``train_ds`` for ``config.epochs`` epochs.

    Returns:
        (the trained model — a clone when a strategy required one, history).

    Raises:
        CancelledError: ``should_cancel`` returned True during training.
        DataError: a record became unreadable during training.
    """
    model = in_strategy(model, device)
    compile_for_training(model, config, device)
    if config.epochs == 0:
        return model, {}
    steps = config.steps_per_epoch
    if steps is None:
        cardinality = int(train_ds.cardinality())
        steps = cardinality if cardinality > 0 else None
    hooks = _Hooks(config.epochs, steps, on_progress, should_cancel)
    with data_loss_as_data_error():
        history = model.fit(
            train_ds,
            epochs=config.epochs,
            steps_per_epoch=config.steps_per_epoch,
            callbacks=[hooks],
            shuffle=False,  # the dataset shuffles itself (make_dataset); Keras would warn
            verbose=0,
        )
    if hooks.cancelled:
        raise CancelledError("fine-tuning was cancelled")
    return model, {k: [float(v) for v in vals] for k, vals in history.history.items()}


@contextmanager
def data_loss_as_data_error() -> Iterator[None]:
    """A record that became unreadable after the data was checked: DataError, not a crash.

    make_dataset checks every record first; this covers data that changes
    under a running job (a file rewritten, or streamed and cut off).
    """
    import tensorflow as tf

    from secateur.pruner.data import tf_reason

    try:
        yield
    except tf.errors.FailedPreconditionError as exc:
        if "expected to contain" not in str(exc):  # make_dataset's counted length
            raise
        raise DataError(
            "data must not change while a job runs; the records counted when it was checked "
            f"are no longer there. Received: {tf_reason(exc)}"
        ) from exc
    except tf.errors.DataLossError as exc:
        raise DataError(
            "data must stay readable while training; corrupt or truncated records are not "
            f"skipped. Received: {tf_reason(exc)}"
        ) from exc


def evaluate(model: Any, eval_ds: Any) -> float:
    """Top-1 accuracy of ``model`` on ``eval_ds`` (compiled or not)."""
    import numpy as np

    correct = total = 0
    with data_loss_as_data_error():
        for images, labels in eval_ds:
            logits = model(images, training=False)
            pred = np.argmax(np.asarray(logits), axis=-1)
            correct += int(np.sum(pred == np.asarray(labels)))
            total += int(pred.shape[0])
    if total == 0:
        raise ValueError("evaluation data is empty")
    return correct / total
