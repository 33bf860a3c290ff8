"""First-order Taylor importance of channels (Molchanov et al. 2017/2019).

Removing channel ``c`` of a layer's output ``a`` for one example changes the
loss by about ``-sum over positions of a_c * dL/da_c``; the channel's score is
the absolute value of that sum, added over the examples of a few training
batches. The activations are the outputs of the layers that produce a
group's channels (:func:`secateur.pruner.scoring.taylor` picks them), taken
from the model's own forward pass in inference mode (BatchNorm uses its
moving statistics and is left unchanged, Dropout is off).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
import tensorflow as tf

from secateur.pruner._keras import keras
from secateur.pruner.graph import ChannelGraph

_PRODUCER_ROLES = ("bn_gamma", "out", "depthwise")


def taylor_scores(
    model: Any, graph: ChannelGraph, data: Iterable[Any] | None, batches: int
) -> dict[str, np.ndarray]:
    """Per producing layer (path): one Taylor score per output channel position.

    Args:
        model: the ``keras.Model``; single-output classifier with integer labels.
        graph: its traced graph (names the producing layers).
        data: ``(inputs, labels)`` batches; the first ``batches`` are read.
        batches: how many batches to read.

    Returns:
        ``{layer path: scores}`` (float64, length = the layer's channels);
        layers whose output is not one tensor are absent.
    """
    from secateur.pruner.losses import outputs_probabilities

    paths = {m.layer for g in graph.groups() for m in g.members if m.role in _PRODUCER_ROLES}
    layers = {p: graph.layers[p] for p in sorted(paths) if p in graph.layers}
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=not outputs_probabilities(model)
    )
    totals: dict[str, np.ndarray] = {}
    seen: dict[str, list[Any]] = {}
    holder: list[tf.GradientTape] = []
    patched = {p: _record(layer, p, seen, holder) for p, layer in layers.items()}
    try:
        for images, labels in itertools.islice(iter(data or ()), batches):
            seen.clear()
            with tf.GradientTape() as tape:
                holder[:] = [tape]
                loss = loss_fn(labels, model(images, training=False))
            names = [(p, i) for p, outs in seen.items() for i in range(len(outs))]
            grads = tape.gradient(loss, [seen[p][i] for p, i in names])
            for (p, i), grad in zip(names, grads, strict=True):
                if grad is None:
                    continue
                prod = tf.cast(seen[p][i], tf.float32) * tf.cast(grad, tf.float32)
                spatial = list(range(1, len(prod.shape) - 1))
                per_example = tf.abs(tf.reduce_sum(prod, axis=spatial) if spatial else prod)
                score = np.asarray(tf.reduce_sum(per_example, axis=0), dtype=np.float64)
                totals[p] = totals.get(p, 0.0) + score
    finally:
        for p, layer in layers.items():
            _restore(layer, patched[p])
    return totals


def _record(layer: Any, path: str, seen: dict[str, list[Any]], holder: list[Any]) -> Any:
    """Make ``layer.call`` keep (and the current tape watch) every output tensor."""
    had = layer.__dict__.get("call")
    original = layer.call

    def call(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if tf.is_tensor(out) and holder:
            holder[0].watch(out)
            seen.setdefault(path, []).append(out)
        return out

    object.__setattr__(layer, "call", call)
    return had


def _restore(layer: Any, had: Any) -> None:
    if had is None:
        object.__delattr__(layer, "call")
    else:
        object.__setattr__(layer, "call", had)
