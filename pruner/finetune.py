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
from secateur.pruner.epoch_data import ByEpoch, fit_by_epoch
from secateur.pruner.errors import CancelledError, DataError
from secateur.pruner.losses import outputs_probabilities


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


def compile_for_training(
    model: Any,
    config: TrainConfig,
    device: Device,
    steps_per_execution: int = 1,
    mixed_precision: str = "off",
) -> None:
    """Compile with SGD(momentum) and the loss the model's output calls for.

    ``mixed_float16`` wraps the optimizer in a LossScaleOptimizer (float16
    gradients underflow without loss scaling); bfloat16 needs none.
    """
    # The optimizer's variables belong to the strategy the model was built under
    # (Keras 3 refuses to mix a multi-worker model with a default-scope optimizer).
    with model.distribute_strategy.scope():
        optimizer = keras.optimizers.SGD(
            learning_rate=config.learning_rate, momentum=config.momentum
        )
        if mixed_precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=not outputs_probabilities(model)
        ),
        metrics=["accuracy"],
        jit_compile=device.use_xla(config.jit_compile),
        steps_per_execution=steps_per_execution,
    )


#: ``steps_per_execution="auto"``: long device loops where a host round trip
#: is dear (TPU), moderate on GPU, and 1 on CPU where it costs nothing.
AUTO_STEPS_PER_EXECUTION = {"TPU": 100, "GPU": 16, "CPU": 1}
#: ``mixed_precision="auto"``: the policy each device computes fastest in.
AUTO_MIXED_PRECISION = {"TPU": "mixed_bfloat16", "GPU": "mixed_float16", "CPU": "off"}


@dataclass(frozen=True)
class TrainingSetup:
    """How fine-tuning runs on a device, ``"auto"`` settings resolved (the report's)."""

    steps_per_execution: int
    mixed_precision: str  # "off" (float32) or a Keras policy name
    xla: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps_per_execution": self.steps_per_execution,
            "mixed_precision": self.mixed_precision,
            "xla": self.xla,
        }


def resolve_steps_per_execution(
    setting: int | str, kind: str, steps_per_epoch: int | None = None
) -> int:
    """Steps per execution: ``"auto"`` is the device's, at most one epoch; an int as given."""
    if setting != "auto":
        return int(setting)
    steps = AUTO_STEPS_PER_EXECUTION.get(kind, 1)
    return max(1, min(steps, steps_per_epoch)) if steps_per_epoch else steps


def training_setup(
    config: TrainConfig, device: Device, steps_per_epoch: int | None = None
) -> TrainingSetup:
    """The resolved loop settings ``finetune`` uses for ``config`` on ``device``."""
    precision = config.mixed_precision
    if precision == "auto":
        precision = AUTO_MIXED_PRECISION.get(device.kind, "off")
    return TrainingSetup(
        resolve_steps_per_execution(config.steps_per_execution, device.kind, steps_per_epoch),
        precision,
        device.use_xla(config.jit_compile),
    )


def epoch_steps(train_ds: Any, config: TrainConfig) -> int | None:
    """Steps per epoch: the configured count, else the data's known length (None: unknown)."""
    if config.steps_per_epoch is not None:
        return config.steps_per_epoch
    cardinality = int(train_ds.cardinality())
    return cardinality if cardinality > 0 else None


def with_policy(model: Any, policy: str, device: Device) -> Any:
    """A copy of ``model`` computing in ``policy`` (same float32 weights).

    The output layer stays float32 so the softmax and the loss see full
    precision (Keras's mixed precision guidance). ``"float32"`` turns a
    mixed copy back into a plain model.
    """
    import tensorflow as tf

    outputs = {id(t._keras_history[0]) for t in model.outputs}

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        config["dtype"] = "float32" if id(layer) in outputs else policy
        return layer.__class__.from_config(config)

    strategy = device.strategy if device.strategy is not None else tf.distribute.get_strategy()
    with strategy.scope():
        copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
        copy.set_weights(model.get_weights())
    return copy


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
                    # Keras counts a last, shorter execution as a whole one.
                    min(batch + 1, self.steps) if self.steps else batch + 1,
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
    teacher: Any | None = None,
    by_epoch: ByEpoch | None = None,
) -> tuple[Any, dict[str, list[float]]]:
    """Train ``model`` on ``train_ds`` for ``config.epochs`` epochs.

    With ``teacher`` (a model under the device's strategy) and
    ``config.distill_alpha > 0`` the loss also distills the teacher's soft
    outputs (:mod:`secateur.pruner.distill`). With ``by_epoch`` the epochs'
    data come from it (``train_ds`` sets the steps per epoch only), and
    training can start from, and checkpoint, a ``TrainState``.

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
    steps = epoch_steps(train_ds, config)
    setup = training_setup(config, device, steps)
    trained = model
    if setup.mixed_precision != "off":
        trained = with_policy(model, setup.mixed_precision, device)
    compile_for_training(trained, config, device, setup.steps_per_execution, setup.mixed_precision)
    fitted = trained
    if teacher is not None and config.distill_alpha > 0:
        from secateur.pruner.distill import distiller

        fitted = distiller(trained, teacher, config, setup.xla, setup.steps_per_execution)
    # Progress and cancellation are looked at once per execution (Keras calls
    # batch-end hooks there), so the host syncs every steps_per_execution steps.
    hooks = _Hooks(config.epochs, steps, on_progress, should_cancel)
    with data_loss_as_data_error():
        if by_epoch is not None:
            history = fit_by_epoch(fitted, trained, config, hooks, by_epoch)
        else:
            history = fitted.fit(
                train_ds,
                epochs=config.epochs,
                steps_per_epoch=config.steps_per_epoch,
                callbacks=[hooks],
                shuffle=False,  # the dataset shuffles itself (make_dataset); Keras would warn
                verbose=0,
            ).history
    if hooks.cancelled:
        raise CancelledError("fine-tuning was cancelled")
    if trained is not model:  # mixed precision trained a copy: float32 weights back
        model.set_weights(trained.get_weights())
    return model, {k: [float(v) for v in vals] for k, vals in history.items()}


def recalibrate_batchnorm(model: Any, dataset: Any, batches: int) -> int:
    """Re-estimate the moving mean and variance of ``model``'s BatchNorm layers.

    Pruning changes what every BatchNormalization after a pruned layer sees,
    and a short fine-tune moves the moving statistics only part of the way
    (momentum 0.99), so the model evaluates with statistics of a network that
    no longer exists: on the digits VGG-16-BN after 24 steps at learning rate
    0.001, accuracy with batch statistics was 0.84 and with the moving ones
    0.48 (this re-estimate: 0.96). As adaptive BatchNorm (Li et al., EagleEye,
    2020): forward passes in training mode over ``batches`` batches, no
    weight updated, each layer's statistics the mean over those batches of
    the per-batch mean and variance. Layers with ``trainable=False`` (frozen
    on purpose) keep theirs. A model living in a distribution strategy is
    re-estimated on a host copy and the statistics copied back.

    Returns:
        The number of batches used (fewer when the data set is shorter).

    Raises:
        DataError: a record became unreadable.
    """
    import tensorflow as tf

    if batches <= 0 or not _trainable_norms(model):
        return 0
    host = model
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is not None and strategy is not tf.distribute.get_strategy():
        from secateur.pruner.cluster import out_of_strategy

        host = out_of_strategy(model)
    norms = _trainable_norms(host)
    used, sums = _batch_statistics(host, norms, dataset, batches)
    if used == 0:
        return 0
    for (mean, var), layer in zip(sums, norms):
        layer.moving_mean.assign((mean / used).astype(layer.moving_mean.dtype))
        layer.moving_variance.assign((var / used).astype(layer.moving_variance.dtype))
    if host is not model:
        model.set_weights(host.get_weights())
    return used


def _trainable_norms(model: Any) -> list[Any]:
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]


def _batch_statistics(
    model: Any, norms: list[Any], dataset: Any, batches: int
) -> tuple[int, list[list[Any]]]:
    """(batches run, per layer [sum of batch means, sum of batch variances])."""
    import numpy as np
    import tensorflow as tf

    momenta = [layer.momentum for layer in norms]
    sums = [
        [np.zeros(layer.moving_mean.shape), np.zeros(layer.moving_mean.shape)] for layer in norms
    ]

    @tf.function
    def forward(images: Any) -> None:
        model(images, training=True)

    used = 0
    try:
        for layer in norms:  # each call replaces the moving statistics by the batch's
            layer.momentum = 0.0
        with data_loss_as_data_error():
            for element in dataset.take(batches):
                forward(element[0] if isinstance(element, tuple) else element)
                for (mean, var), layer in zip(sums, norms):
                    mean += np.asarray(layer.moving_mean, dtype=np.float64)
                    var += np.asarray(layer.moving_variance, dtype=np.float64)
                used += 1
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
    return used, sums


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


def evaluate(model: Any, eval_ds: Any, jit_compile: bool = False) -> float:
    """Top-1 accuracy of ``model`` on ``eval_ds`` (see :func:`evaluate_counts`)."""
    correct, total = evaluate_counts(model, eval_ds, jit_compile)
    return correct / total


def evaluate_counts(model: Any, eval_ds: Any, jit_compile: bool = False) -> tuple[int, int]:
    """(correct top-1 predictions, examples) of ``model`` on ``eval_ds``.

    One compiled loop over the whole data set under the strategy the model
    lives in (batches distributed to its replicas, counts summed on device):
    the host waits once, not once per batch. ``jit_compile`` compiles the
    per-batch step with XLA. Counts are integers, so the accuracy is exact.

    Raises:
        ValueError: the data set is empty.
        DataError: a record became unreadable.
    """
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()

    @tf.function(jit_compile=jit_compile)
    def step(images: Any, labels: Any) -> tuple[Any, Any]:
        labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
        pred = tf.argmax(model(images, training=False), axis=-1, output_type=tf.int64)
        hits = tf.reduce_sum(tf.cast(tf.equal(pred, labels), tf.int64))
        return hits, tf.shape(labels, out_type=tf.int64)[0]

    @tf.function
    def loop(batches: Any) -> tuple[Any, Any]:
        correct = tf.constant(0, tf.int64)
        total = tf.constant(0, tf.int64)
        for images, labels in batches:
            hits, n = strategy.run(step, args=(images, labels))
            correct += strategy.reduce("SUM", hits, axis=None)
            total += strategy.reduce("SUM", n, axis=None)
        return correct, total

    with data_loss_as_data_error(), strategy.scope():
        correct, total = loop(strategy.experimental_distribute_dataset(eval_ds))
    if int(total) == 0:
        raise ValueError("evaluation data is empty")
    return int(correct), int(total)
