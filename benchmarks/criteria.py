"""Global ranking by l1, lamp and taylor at one ratio, on the digits VGG-16-BN.

Trains the study's VGG-16-BN (width 0.25) on scikit-learn's digits, then for
each criterion prunes the same model globally at ``--ratio``, reloads the
kept weights, and reports the accuracy right after pruning and after a short
fine-tune (``--finetune-epochs`` of SGD 0.01, momentum 0.9), the params left
and how many layers were cut to a single channel (global l1 empties layers
whose weights are small: its scores are not comparable across layers).

Usage:
    python benchmarks/criteria.py [--ratio 0.5] [--pretrain-epochs 8]
        [--finetune-epochs 1] [--seed 0] [--criteria l1,lamp,taylor]
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import sys
import time
from typing import Any

import numpy as np
from bias_compensation import accuracy, train  # the same model, split and recipe


def prune_one(
    model: Any, criterion: str, args: argparse.Namespace, data: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    from secateur.pruner import PruneSpec, apply_plan, make_plan
    from secateur.pruner._keras import keras

    images, labels = data
    batches = [
        (images[i : i + 64], labels[i : i + 64]) for i in range(0, len(labels), 64)
    ]  # fmt: skip
    spec = PruneSpec(ratio=args.ratio, criterion=criterion, scope="global", seed=args.seed)
    start = time.perf_counter()
    plan = make_plan(model, spec, data=batches)
    scored = time.perf_counter() - start
    pruned = apply_plan(model, plan)
    widths = plan.layer_widths
    row = {
        "criterion": criterion,
        "params": plan.params_after,
        "params_before": plan.params_before,
        "single_channel_layers": sum(1 for _, after in widths.values() if after == 1),
        "min_width": min((after for _, after in widths.values()), default=None),
        "plan_seconds": scored,
    }
    row["acc_pruned"] = accuracy(pruned, args.eval)
    keras.utils.set_random_seed(args.seed)
    pruned.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    pruned.fit(images, labels, epochs=args.finetune_epochs, batch_size=64, verbose=0)
    row["acc_finetuned"] = accuracy(pruned, args.eval)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--criteria", default="l1,lamp,taylor")
    args = parser.parse_args()
    from secateur.pruner.datasets import digits_images

    model, evaluation = train(args.pretrain_epochs, args.seed)
    args.eval = evaluation
    images, labels = digits_images()
    order = np.random.default_rng(0).permutation(len(labels))
    split = int(0.8 * len(labels))
    train_data = (images[order][:split], labels[order][:split])  # train()'s split
    base = accuracy(model, evaluation)
    print(f"original: accuracy {base:.4f} on {len(evaluation[1])} held-out images")
    print("| criterion | params | layers at 1 channel | min width | acc. pruned | acc. tuned |")
    print("|---|---|---|---|---|---|")
    for criterion in args.criteria.split(","):
        r = prune_one(model, criterion, args, train_data)
        print(
            f"| {criterion} | {r['params']:,} / {r['params_before']:,} | "
            f"{r['single_channel_layers']} | {r['min_width']} | {r['acc_pruned']:.4f} | "
            f"{r['acc_finetuned']:.4f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
