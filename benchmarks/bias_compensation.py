"""Accuracy right after pruning, before any fine-tuning, with and without bias compensation.

Trains the demo's digits VGG-16-BN (width 0.25, dense 128; sklearn digits
upscaled to 32x32x3, 80/20 split, SGD 0.01 momentum 0.9) for a few epochs,
then prunes it two ways and evaluates each pruned model as is:

- ``one``: one channel per prunable group, the one of smallest |gamma|;
- ``r0.1``: ``PruneSpec(ratio=0.1, scope="layerwise", criterion="bn_scale")``.

Each plan is applied twice, ``bias_compensation`` off and on; both
accuracies print in one run. A last row zeroes the gammas of the ``one``
plan's channels first (where Network Slimming's sparsity training aims):
their outputs are then exact constants, relu(beta), and compensation should
keep the accuracy of that model exactly.

Usage: python benchmarks/bias_compensation.py [--epochs 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def train(epochs: int, seed: int) -> tuple[Any, tuple[np.ndarray, np.ndarray]]:
    from secateur.pruner._keras import keras
    from secateur.pruner.datasets import digits_images
    from secateur.pruner.models import vgg16_bn

    images, labels = digits_images()
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    split = int(0.8 * len(labels))
    keras.utils.set_random_seed(seed)
    model = vgg16_bn((32, 32, 3), 10, width=0.25, dense=128, name="digits_vgg16_bn")
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(images[:split], labels[:split], epochs=epochs, batch_size=64, verbose=0)
    return model, (images[split:], labels[split:])


def accuracy(model: Any, data: tuple[np.ndarray, np.ndarray]) -> float:
    logits = np.asarray(model.predict(data[0], batch_size=256, verbose=0))
    return float(np.mean(np.argmax(logits, axis=-1) == data[1]))


def one_per_group(model: Any) -> Any:
    """A plan removing the smallest-|gamma| channel of every prunable group."""
    from secateur.pruner import PruneSpec, make_plan

    plan = make_plan(model, PruneSpec(ratio=0.0, criterion="bn_scale"))
    for g in plan.groups:
        gammas = [m for m in g.members if m.role == "bn_gamma"]
        if g.frozen or g.size_before < 2 or not gammas:
            continue
        layer = model.get_layer(gammas[0].layer)
        drop = int(np.argmin(np.abs(layer.gamma.numpy())))
        g.kept = [k for k in range(g.size_before) if k != drop]
        g.size_after = len(g.kept)
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from secateur.pruner import PruneSpec, make_plan

    model, data = train(args.epochs, args.seed)
    print(f"trained {args.epochs} epochs: accuracy {accuracy(model, data):.4f}")
    plans = {
        "one": one_per_group(model),
        "r0.1": make_plan(model, PruneSpec(ratio=0.1, scope="layerwise", criterion="bn_scale")),
    }
    for name, plan in plans.items():
        report(name, model, plan, data)
    zero_gammas(model, plans["one"])
    print(f"gammas of the 'one' channels set to 0: accuracy {accuracy(model, data):.4f}")
    report("one@0", model, plans["one"], data)


def report(name: str, model: Any, plan: Any, data: tuple[np.ndarray, np.ndarray]) -> None:
    from secateur.pruner import apply_plan

    row = [f"{name:5s} removed {plan.removed_channels:3d} channels:"]
    for compensate in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hand-made plan: notes not recorded
            pruned = apply_plan(model, plan, bias_compensation=compensate)
        row.append(f"compensation {'on ' if compensate else 'off'} {accuracy(pruned, data):.4f}")
    print("  ".join(row))


def zero_gammas(model: Any, plan: Any) -> None:
    for g in plan.groups:
        gone = sorted(set(range(g.size_before)) - set(g.kept))
        for m in g.members:
            if m.role == "bn_gamma" and gone:
                layer = model.get_layer(m.layer)
                weights = layer.get_weights()
                weights[0][gone] = 0.0
                layer.set_weights(weights)


if __name__ == "__main__":
    main()
