"""Examples/s of Secateur's fine-tuning against a plain ``model.fit``.

Same model (a VGG-BN with Dropout), same data pipeline (``make_dataset`` over
TFRecords written to a temporary directory), same batch, same optimizer and
loss, in one process: Secateur's ``finetune`` (its progress and cancellation
hooks included) and a plain ``model.fit`` with nothing attached, each with op
determinism on and off (``secateur.pruner.determinism.reproducible``). Every
run starts from the same weights and is timed from the end of its first
epoch to the end of its last (compilation, tracing and the first pass over
the data excluded; nothing is attached per batch to the plain fit); each
cell is the median of ``--repeats`` runs, the two loops alternating.

Target: Secateur >= 0.95x of plain fit. The determinism cost is the ratio of
examples/s with it off to on.

Usage: python benchmarks/finetune_throughput.py [--examples 2048] [--batch 128]
       [--epochs 3] [--width 0.25] [--repeats 3] [--xla] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TARGET = 0.95
SHAPE = (32, 32, 3)
CLASSES = 10


def _data(root: str, examples: int, batch: int) -> Any:
    import numpy as np

    from secateur.pruner.data import make_dataset, write_examples

    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        n = examples // 2
        images = rng.uniform(0, 255, (n, *SHAPE)).astype("float32")
        labels = rng.integers(0, CLASSES, n)
        files.append(os.path.join(root, f"train-{i}.tfrecord"))
        write_examples(files[-1], images, labels)
    return make_dataset(files, SHAPE, batch, shuffle=True, seed=0, num_classes=CLASSES)


class _Clock:
    """When each epoch's last step ended; the rate over every epoch after the first."""

    def __init__(self, steps: int, batch: int) -> None:
        self.steps, self.batch = steps, batch
        self.ends: dict[int, float] = {}

    def epoch_end(self, epoch: int) -> None:
        self.ends[epoch] = time.perf_counter()

    def rate(self) -> float:
        first, last = min(self.ends), max(self.ends)
        assert last > first, "time at least two epochs"
        return (last - first) * self.steps * self.batch / (self.ends[last] - self.ends[first])


def _plain(model: Any, ds: Any, clock: _Clock, epochs: int, xla: bool) -> float:
    """A plain model.fit: nothing attached per batch (an epoch-end timestamp only)."""
    import keras

    from secateur.pruner.losses import outputs_probabilities

    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=not outputs_probabilities(model)
        ),
        metrics=["accuracy"],
        jit_compile=xla,
    )
    timer = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: clock.epoch_end(e + 1))
    model.fit(ds, epochs=epochs, callbacks=[timer], shuffle=False, verbose=0)
    return clock.rate()


def _secateur(model: Any, ds: Any, clock: _Clock, epochs: int, xla: bool) -> float:
    """Secateur's finetune, its progress and cancellation hooks as a job runs them."""
    from secateur.pruner.config import TrainConfig
    from secateur.pruner.finetune import finetune, select_device

    def progress(p: Any) -> None:
        if p.step == p.steps:
            clock.epoch_end(p.epoch)

    config = TrainConfig(epochs=epochs, batch_size=clock.batch, jit_compile=xla)
    finetune(model, ds, config, select_device(), progress, lambda: False)
    return clock.rate()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import keras

    from secateur.pruner.determinism import reproducible
    from secateur.pruner.models import vgg16_bn

    rows = []
    with tempfile.TemporaryDirectory(prefix="secateur-bench-") as root:
        ds = _data(root, args.examples, args.batch)
        steps = int(ds.cardinality())
        keras.utils.set_random_seed(0)
        base = vgg16_bn(SHAPE, CLASSES, width=args.width, dense=128, name="bench_vgg")
        weights = base.get_weights()
        for deterministic in (True, False):
            rates: dict[str, list[float]] = {"plain": [], "secateur": []}
            for _ in range(args.repeats):
                for name, loop in (("plain", _plain), ("secateur", _secateur)):
                    with reproducible(0, deterministic):
                        model = keras.models.clone_model(base)
                        model.set_weights(weights)
                        clock = _Clock(steps, args.batch)
                        rates[name].append(loop(model, ds, clock, args.epochs, args.xla))
            plain, ours = (statistics.median(rates[k]) for k in ("plain", "secateur"))
            rows.append(
                {
                    "deterministic": deterministic,
                    "plain_examples_per_s": plain,
                    "secateur_examples_per_s": ours,
                    "ratio": ours / plain,
                    "runs": rates,
                }
            )
    return rows


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    lines = [
        f"device: {f'GPU x{len(gpus)}' if gpus else 'CPU'}, batch {args.batch}, "
        f"{args.examples} examples, VGG-BN width {args.width}, XLA {args.xla}, "
        f"{args.epochs} epochs a run (first untimed), median of {args.repeats}",
        f"{'determinism':<12} {'plain fit ex/s':>15} {'secateur ex/s':>14} {'ratio':>7}",
    ]
    for r in rows:
        lines.append(
            f"{'on' if r['deterministic'] else 'off':<12} {r['plain_examples_per_s']:>15.1f} "
            f"{r['secateur_examples_per_s']:>14.1f} {r['ratio']:>6.3f}x"
            + ("" if r["ratio"] >= TARGET else f"  (below the {TARGET}x target)")
        )
    on, off = rows
    for key, label in (("plain_examples_per_s", "plain"), ("secateur_examples_per_s", "secateur")):
        lines.append(f"determinism cost ({label}): step time on / off = {off[key] / on[key]:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is untimed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--xla", action="store_true", help="jit_compile=True for both loops")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = run(args)
    print(table(rows, args))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
