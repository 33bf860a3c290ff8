"""The CIFAR-10 study's training pieces: input pipeline, base model, one pruning run.

Input pipeline (tf.data): the converted TFRecords read once into uint8
arrays (:func:`secateur.pruner.cifar10.load_arrays`), shuffled every epoch,
batched, then augmented per batch with stateless ops seeded from a
``Dataset.random`` stream (reproducible under op determinism, different every
epoch): a random crop of the image zero-padded by 4 pixels and a random
horizontal flip, the standard CIFAR-10 augmentation.

Recipe: SGD with momentum 0.9, batch 128 (the study's). The base model is
trained with the learning rate on a cosine from ``base_lr`` (0.05) to 0 and
weight decay 5e-4; pruned models are fine-tuned by the product's own
:func:`secateur.pruner.finetune.finetune` at the study's constant 0.01, in
stages ``((epochs, lr), ...)`` so an arm can end on a lower rate.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

PAD = 4


@dataclass
class Data:
    """The study's data in memory (uint8 images, int64 labels) and its datasets."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    batch_size: int = 128
    _cache: dict[Any, Any] = field(default_factory=dict)

    def train(self, seed: int) -> Any:
        """Augmented training batches, reshuffled every epoch (seeded)."""
        if ("train", seed) not in self._cache:
            self._cache[("train", seed)] = augmented(
                self.train_x, self.train_y, self.batch_size, seed
            )
        return self._cache[("train", seed)]

    def test(self) -> Any:
        """The test images in order, unaugmented."""
        import tensorflow as tf

        if "test" not in self._cache:
            ds = tf.data.Dataset.from_tensor_slices((self.test_x, self.test_y))
            self._cache["test"] = ds.batch(500).map(_to_float).prefetch(2)
        return self._cache["test"]


def load_data(cache_dir: str | None, limit: int | None, batch_size: int) -> Data:
    """Fetch (once per machine) and read CIFAR-10; ``limit``: the first images of each split."""
    from secateur.pruner.cifar10 import fetch, load_arrays

    files = fetch(cache_dir)
    tx, ty = load_arrays(files.train)
    vx, vy = load_arrays(files.test)
    if limit:
        tx, ty, vx, vy = tx[:limit], ty[:limit], vx[:limit], vy[:limit]
    return Data(tx, ty, vx, vy, batch_size)


def _to_float(x: Any, y: Any) -> tuple[Any, Any]:
    import tensorflow as tf

    return tf.cast(x, tf.float32), y


def augment_batch(x: Any, y: Any, seed: Any) -> tuple[Any, Any]:
    """Random 4-pixel-padded crop and horizontal flip of each image of a uint8 batch.

    ``seed``: two int64s (stateless ops: the same seed, the same augmentation).
    """
    import tensorflow as tf

    x = tf.cast(x, tf.float32)
    n, side = tf.shape(x)[0], tf.shape(x)[1]
    padded = tf.pad(x, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
    offsets = tf.random.stateless_uniform(
        [n, 2], seed=seed, minval=0, maxval=2 * PAD + 1, dtype=tf.int32
    )
    span = tf.range(side)
    rows = offsets[:, :1] + span[None, :]
    cols = offsets[:, 1:] + span[None, :]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    out = tf.gather(out, cols, axis=2, batch_dims=1)
    flip = tf.random.stateless_uniform([n], seed=seed[::-1]) < 0.5
    out = tf.where(flip[:, None, None, None], tf.reverse(out, axis=[2]), out)
    return out, y


def augmented(images: np.ndarray, labels: np.ndarray, batch: int, seed: int) -> Any:
    """The augmented training dataset (a known length: ceil(N / batch) steps)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True).batch(batch)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds).map(
        lambda xy, s: augment_batch(xy[0], xy[1], s), num_parallel_calls=tf.data.AUTOTUNE
    )
    steps = -(-len(labels) // batch)
    return ds.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(tf.data.AUTOTUNE)


def correct_of(model: Any, data: Data) -> np.ndarray:
    """Whether ``model`` gets each test image right, in order (bool, N)."""
    logits = model.predict(data.test(), verbose=0)
    return np.argmax(logits, axis=-1) == data.test_y


def pack(correct: np.ndarray) -> str:
    """Per-image outcomes as hex (1,250 bytes for 10,000 images)."""
    return np.packbits(correct.astype(np.uint8)).tobytes().hex()


def unpack(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), np.uint8))[:n].astype(bool)


def train_base(
    path: str, data: Data, width: float, epochs: int, lr: float, seed: int = 0
) -> dict[str, Any]:
    """Train VGG-16-BN (``width``) from scratch, save it at ``path``; its record."""
    from secateur.pruner._keras import keras
    from secateur.pruner.determinism import reproducible
    from secateur.pruner.models import vgg16_bn

    with reproducible(seed):
        model = vgg16_bn(width=width)
        steps = epochs * -(-len(data.train_y) // data.batch_size)
        schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps)
        model.compile(
            optimizer=keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=5e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        start = time.perf_counter()
        history = model.fit(data.train(seed), epochs=epochs, verbose=2)
        took = time.perf_counter() - start
        correct = correct_of(model, data)
    tmp = path + ".partial.keras"
    model.save(tmp)
    os.replace(tmp, path)
    return {
        "width": width,
        "epochs": epochs,
        "lr": lr,
        "params": int(model.count_params()),
        "accuracy": float(correct.mean()),
        "correct": pack(correct),
        "train_seconds": took,
        "seconds_per_epoch": took / max(1, epochs),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }


@dataclass(frozen=True)
class Arm:
    """One arm: how to prune and how to fine-tune.

    ``stages``: fine-tuning as ((epochs, learning rate), ...); ``control``:
    nothing pruned (the same fine-tune on the unpruned model).
    """

    spec: dict[str, Any]
    stages: tuple[tuple[int, float], ...]
    sparsity: bool = False
    distill: float = 0.0
    control: bool = False
    #: (epochs, lambda) of this arm's own sparsity training (None: the study's)
    sparse: tuple[int, float] | None = None


def finetune_stages(
    model: Any, data: Data, arm: Arm, seed: int, device: Any, teacher: Any, fraction: float = 1.0
) -> tuple[Any, list[float]]:
    """The arm's fine-tuning stages (``fraction`` of each epoch's steps); (model, losses)."""
    from secateur.pruner.config import TrainConfig
    from secateur.pruner.finetune import finetune

    steps = max(1, int(fraction * -(-len(data.train_y) // data.batch_size)))
    losses: list[float] = []
    for epochs, lr in arm.stages:
        config = TrainConfig(
            epochs=epochs,
            batch_size=data.batch_size,
            learning_rate=lr,
            steps_per_epoch=steps if fraction < 1 else None,
            distill_alpha=arm.distill,
        )
        model, history = finetune(model, data.train(seed), config, device, teacher=teacher)
        losses += history.get("loss", [])
    return model, losses


def run_one(
    base_path: str, arm: Arm, ratio: float, seed: int, data: Data, sparse_path: str | None
) -> dict[str, Any]:
    """Prune the base model (or its sparsity-trained copy) at ``ratio``, fine-tune, evaluate."""
    from secateur.pruner.determinism import reproducible
    from secateur.pruner.distill import make_teacher
    from secateur.pruner.finetune import select_device
    from secateur.pruner.modelio import load_model
    from secateur.pruner.plan import make_plan
    from secateur.pruner.spec import PruneSpec
    from secateur.pruner.surgery import apply_plan
    from secateur.pruner.tracing import analyze

    start = time.perf_counter()
    with reproducible(seed):
        device = select_device()
        original = load_model(base_path)
        model = load_model(sparse_path) if arm.sparsity and sparse_path else original
        teacher = make_teacher(original, device) if arm.distill else None
        spec = PruneSpec(ratio=ratio, scope="global", seed=seed, **arm.spec)
        rounds = spec.round_ratios() if not arm.control else ()
        plan, history = None, []
        if not rounds:
            model, history = finetune_stages(model, data, arm, seed, device, teacher)
        for j in range(len(rounds)):
            step = spec.round_spec(j)
            plan = make_plan(model, step, analyze(model), device.kind, data.train(seed))
            model = apply_plan(model, plan, reload_weights=step.reload_weights)
            part = 1.0 / len(rounds)
            model, losses = finetune_stages(model, data, arm, seed, device, teacher, part)
            history += losses
        correct = correct_of(model, data)
    return {
        "ratio": ratio,
        "seed": seed,
        "accuracy": float(correct.mean()),
        "correct": pack(correct),
        "params": int(model.count_params()),
        "flops": plan.flops_after if plan else None,
        "finetune_epochs": sum(e for e, _ in arm.stages),
        "loss": history,
        "seconds": time.perf_counter() - start,
    }


def sparsity_base(
    base_path: str, out: str, data: Data, seed: int, epochs: int, lam: float
) -> dict[str, Any]:
    """Network Slimming's L1 on BN gammas for ``epochs`` from the base; saved at ``out``."""
    from secateur.pruner.config import TrainConfig
    from secateur.pruner.determinism import reproducible
    from secateur.pruner.finetune import select_device
    from secateur.pruner.modelio import load_model
    from secateur.pruner.sparsity import sparsity_train
    from secateur.pruner.tracing import analyze

    start = time.perf_counter()
    with reproducible(seed):
        base = load_model(base_path)
        config = TrainConfig(
            batch_size=data.batch_size, sparsity_epochs=epochs, sparsity_lambda=lam
        )
        sparse = sparsity_train(base, analyze(base), data.train(seed), config, select_device())
        correct = correct_of(sparse, data)
    gammas = np.concatenate(
        [np.abs(w.numpy()).ravel() for w in sparse.weights if w.path.endswith("gamma")]
    )
    tmp = out + ".partial.keras"
    sparse.save(tmp)
    os.replace(tmp, out)
    return {
        "seed": seed,
        "epochs": epochs,
        "lambda": lam,
        "accuracy": float(correct.mean()),
        "gammas_below_0.05": float(np.mean(gammas < 0.05)),
        "gammas_below_0.01": float(np.mean(gammas < 0.01)),
        "gamma_quantiles": {f"{q:g}": float(np.quantile(gammas, q)) for q in (0.3, 0.5, 0.7)},
        "seconds": time.perf_counter() - start,
    }


def with_epochs(arm: Arm, epochs: int) -> Arm:
    """``arm`` with its first stage's epochs replaced (the short budget flag)."""
    return replace(arm, stages=((epochs, arm.stages[0][1]), *arm.stages[1:]))
