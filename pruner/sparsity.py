"""Sparsity training before scoring (Network Slimming, Liu et al. 2017).

Train the model for a few epochs with an L1 penalty ``lambda * sum|gamma|`` on
the BatchNorm scales of its prunable groups, so the unimportant channels'
gammas go towards zero and the ``bn_scale`` ranking separates. The penalty is
set on a training copy only: the model handed back has the trained weights
under the original's configuration (no regulariser left in it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from secateur.pruner._keras import keras
from secateur.pruner.config import TrainConfig
from secateur.pruner.finetune import Device, Progress, finetune


def prunable_gammas(graph: Any) -> list[str]:
    """Names of the BatchNorm layers whose gamma belongs to a prunable group."""
    names = {
        m.layer for g in graph.groups() if g.prunable for m in g.members if m.role == "bn_gamma"
    }
    return sorted(names)


def _penalised_config(model: Any, layers: set[str], lam: float) -> dict[str, Any]:
    config = model.get_config()
    l1 = keras.regularizers.serialize(keras.regularizers.L1(lam))
    for layer in config["layers"]:
        if layer.get("config", {}).get("name") in layers:
            layer["config"]["gamma_regularizer"] = l1
    return config


def sparsity_train(
    model: Any,
    graph: Any,
    train_ds: Any,
    config: TrainConfig,
    device: Device,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Any:
    """``config.sparsity_epochs`` epochs of training with the L1 gamma penalty.

    Args:
        model: the model to sparsify (left untouched).
        graph: its traced channel graph (:func:`secateur.pruner.tracing.analyze`).
        train_ds: batched training data.
        config: the job's training settings; ``sparsity_epochs`` and
            ``sparsity_lambda`` say how long and how strongly.

    Returns:
        A new model, outside any distribution strategy, with the original's
        configuration and the sparsity-trained weights.

    Raises:
        CancelledError / DataError: as :func:`secateur.pruner.finetune.finetune`.
    """
    layers = set(prunable_gammas(graph))
    copy = model.__class__.from_config(_penalised_config(model, layers, config.sparsity_lambda))
    copy.set_weights(model.get_weights())
    trained, _ = finetune(
        copy,
        train_ds,
        replace(config, epochs=config.sparsity_epochs),
        device,
        on_progress,
        should_cancel,
    )
    clean = model.__class__.from_config(model.get_config())
    clean.set_weights(trained.get_weights())
    return clean


def sparsify(
    model: Any,
    graph: Any,
    train_ds: Any,
    config: TrainConfig,
    device: Device,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[Any, Any]:
    """A job's sparsity training: (the sparsity-trained copy, its traced graph).

    Every member of a multi-host job trains on its share of each global batch.
    """
    from secateur.pruner.cluster import member_dataset
    from secateur.pruner.tracing import analyze

    train_ds = member_dataset(train_ds, device)
    base = sparsity_train(model, graph, train_ds, config, device, should_cancel=should_cancel)
    return base, analyze(base)
