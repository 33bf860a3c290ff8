"""Bias compensation: fold what removed channels contributed into the next bias.

A removed channel whose output is constant (see :mod:`secateur.pruner.
constants`) still added ``c * w`` to every Conv/Dense that read it. Folding
``sum over removed inputs of c * kernel`` into that layer's bias (adding a
bias where it had none) keeps outputs exact when ``c`` is exact, and close
when it is the data-free estimate of a small-gamma BatchNorm channel.

A Conv with zero padding sees a constant only partly at its borders; its
fold uses the share of outputs where each tap reads inside: the least-squares
constant over positions, exact for ``valid`` padding, 1x1 kernels and 1x1
maps (and for a global average after the layer); elsewhere the plan notes the
channels folded inexactly.
Exact non-zero constants that reach no foldable bias at all (through zero
padding, a separable or transposed conv, a layer without a propagation
rule) are *live*: :func:`secateur.pruner.plan.make_plan` keeps them in
preference and notes it. A plan never drops a non-zero constant silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secateur.pruner import layout as lay
from secateur.pruner.constants import ConstantTrace, Feed, WeightGetter
from secateur.pruner.graph import ChannelGraph

KeptFn = Callable[[int], np.ndarray]


@dataclass
class Compensation:
    """What folding does for one set of kept channels.

    Attributes:
        deltas: consumer layer path -> value to add to its bias, over the
            layer's original output channels.
        channels: group id -> channels whose constant was folded.
        notes: group id -> caveats (inexact folds, constants that are lost).
    """

    deltas: dict[str, np.ndarray] = field(default_factory=dict)
    channels: dict[int, set[int]] = field(default_factory=dict)
    notes: dict[int, list[str]] = field(default_factory=dict)

    def note(self, gid: int, text: str) -> None:
        if text not in self.notes.setdefault(gid, []):
            self.notes[gid].append(text)


def _kernel(graph: ChannelGraph, path: str, weights: WeightGetter) -> tuple[np.ndarray, int]:
    layer = graph.layers[path]
    idx = next(i for i, w in enumerate(layer.weights) if w is layer.kernel)
    return weights(path, idx), idx


def _owners(
    layout: lay.Layout, positions: np.ndarray, groups: np.ndarray
) -> list[tuple[int, list[int]]]:
    """The groups owning ``positions`` of ``layout``, each with its channels, sorted."""
    if not len(positions):
        return []
    spaces, chans = lay.position_owner(layout)
    gids, chs = groups[spaces[positions]], chans[positions]
    return [(int(g), np.unique(chs[gids == g]).tolist()) for g in np.unique(gids)]


def _fold_feed(
    feed: Feed, kernel: np.ndarray, removed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bias delta of one call, and the removed positions it folds inexactly."""
    st = feed.state
    m = np.where(st.known[removed], st.mean[removed], 0.0)
    k = np.take(kernel, removed, axis=kernel.ndim - 2).astype(np.float64)
    per_tap = np.einsum("...no,n->...o", k, m)
    delta = (per_tap * feed.taps[..., None]).reshape(-1, kernel.shape[-1]).sum(axis=0)
    # Exact constants that a zero-padded border reads are folded inexactly;
    # only those channels' border taps need a look.
    exact = np.flatnonzero(st.is_exact[removed] & (m != 0))
    if not len(exact) or not feed.edge.any():
        return delta, removed[:0]
    at_edge = np.any(k[feed.edge][:, exact] != 0, axis=(0, 2))
    return delta, removed[exact[at_edge]]


def fold(
    graph: ChannelGraph, trace: ConstantTrace, kept: KeptFn, weights: WeightGetter
) -> Compensation:
    """Bias deltas that carry removed channels' constants into their consumers.

    Args:
        graph: the traced model.
        trace: from :func:`secateur.pruner.constant_tracing.trace_constants`.
        kept: space id -> kept channel indices.
        weights: returns a layer's weight ``(path, index)`` as numpy.

    Returns:
        The deltas per consumer, the compensated channels and notes per group.
    """
    out = Compensation()
    groups = graph.space_to_group()
    calls: dict[str, list[np.ndarray]] = {}
    for feed in trace.feeds:
        removed = _removed(feed.layout, kept)
        removed = removed[feed.state.known[removed] & (feed.state.mean[removed] != 0)]
        if not len(removed):
            continue
        kernel, _ = _kernel(graph, feed.path, weights)
        delta, inexact = _fold_feed(feed, kernel, removed)
        calls.setdefault(feed.path, []).append(delta)
        for gid, chs in _owners(feed.layout, removed, groups):
            out.channels.setdefault(gid, set()).update(chs)
        for gid, chs in _owners(feed.layout, inexact, groups):
            for ch in chs:
                out.note(gid, _inexact_note(graph, feed.path, ch))
    for path, deltas in calls.items():
        out.deltas[path] = np.mean(deltas, axis=0)
        if any(not np.allclose(d, deltas[0]) for d in deltas[1:]):
            for gid in _groups_read_by(graph, path, groups):
                out.note(
                    gid,
                    f"shared layer '{path}' reads different constants per call; "
                    "its bias takes their mean",
                )
    for loss in trace.losses:
        removed = np.intersect1d(_removed(loss.layout, kept), np.flatnonzero(loss.mask))
        for gid, chs in _owners(loss.layout, removed, groups):
            for ch in chs:
                out.note(gid, _lost_note(loss.path, loss.cls, ch))
    return out


def live_channels(graph: ChannelGraph, trace: ConstantTrace) -> dict[int, dict[int, str]]:
    """Channels with an exact non-zero constant that no bias can take in.

    Their constant is lost on the way to any consumer (zero padding, a
    layer without a propagation rule), so removing them is never exact.

    Returns:
        group id -> {channel: reason}.
    """
    groups = graph.space_to_group()
    out: dict[int, dict[int, str]] = {}
    for loss in trace.losses:
        for gid, chs in _owners(loss.layout, np.flatnonzero(loss.mask), groups):
            for ch in chs:
                out.setdefault(gid, {})[ch] = _lost_note(loss.path, loss.cls, ch)
    return out


def _removed(layout: lay.Layout, kept: KeptFn) -> np.ndarray:
    keep = lay.kept_positions(layout, kept)
    return np.setdiff1d(np.arange(lay.size(layout)), keep)


def _groups_read_by(graph: ChannelGraph, path: str, groups: np.ndarray) -> set[int]:
    return {
        int(groups[s])
        for (p, _), per_axis in graph.axes.items()
        if p == path
        for ax in per_axis.values()
        if ax.role == "in"
        for s in lay.spaces(ax.layout)
    }


def _inexact_note(graph: ChannelGraph, path: str, channel: int) -> str:
    padding = getattr(graph.layers[path], "padding", "?")
    return (
        f"channel {channel} outputs a non-zero constant that '{path}' (padding={padding!r}) "
        "reads partly from zero padding, so no bias reproduces it exactly at the borders"
    )


def _lost_note(path: str, cls: str, channel: int) -> str:
    return (
        f"channel {channel} outputs a non-zero constant that '{path}' ({cls}) does not "
        "carry to a foldable bias"
    )


def new_biases(graph: ChannelGraph, comp: Compensation) -> list[str]:
    """Consumers that gain a bias (they had none and receive a non-zero delta)."""
    return sorted(
        path
        for path, delta in comp.deltas.items()
        if getattr(graph.layers[path], "bias", None) is None and np.any(delta != 0)
    )


def new_bias_params(graph: ChannelGraph, comp: Compensation, kept: KeptFn) -> int:
    """Parameters the added biases bring, at the pruned widths."""
    total = 0
    for path in new_biases(graph, comp):
        out_layout = _out_layout(graph, path)
        total += len(lay.kept_positions(out_layout, kept))
    return total


def _out_layout(graph: ChannelGraph, path: str) -> lay.Layout:
    layer = graph.layers[path]
    idx = next(i for i, w in enumerate(layer.weights) if w is layer.kernel)
    return graph.axes[(path, idx)][len(layer.kernel.shape) - 1].layout


def bias_values(
    graph: ChannelGraph, comp: Compensation, path: str, kept: KeptFn
) -> np.ndarray | None:
    """The sliced new bias of a consumer that had none, or None."""
    if path not in new_biases(graph, comp):
        return None
    positions = lay.kept_positions(_out_layout(graph, path), kept)
    return np.take(comp.deltas[path], positions).astype(graph.layers[path].kernel.dtype)


def cached_weights(graph: ChannelGraph) -> WeightGetter:
    """A ``(path, index) -> numpy`` getter that reads each weight once."""
    cache: dict[tuple[str, int], np.ndarray] = {}

    def get(path: str, idx: int) -> np.ndarray:
        if (path, idx) not in cache:
            cache[(path, idx)] = read_weight(graph.layers[path].weights[idx])
        return cache[(path, idx)]

    return get


def read_weight(var: Any) -> np.ndarray:
    """A Keras variable's value as a read-only numpy array.

    A TensorFlow variable's value is read without copying: the array shares
    the variable's buffer, which TensorFlow copies on the next write, so the
    array keeps the value it was read with. Copying every kernel of a model
    (twice, through ``Variable.numpy()``) was most of the cost of tracing
    constants. ``tf.Variable.value()`` also skips the identity op that
    ``read_value()`` adds. Other backends copy.
    """
    read = getattr(getattr(var, "value", None), "value", None)
    array = np.asarray(read()) if callable(read) else np.array(var.numpy())
    array.flags.writeable = False
    return array
