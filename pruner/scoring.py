"""Channel importance: one score per channel of every prunable group.

Each criterion is a small function from a member weight axis to a score per
position along that axis; :func:`score_group` scatters positions back onto
the group's channels (a BatchNorm after a Concatenate covers several groups)
and averages over members.

- ``bn_scale``: |gamma| of the BatchNormalization layers in the group
  (Network Slimming, Liu et al. 2017). Raw magnitudes, so that a global
  threshold compares layers, as the paper does. Groups without BatchNorm
  fall back to ``l1`` and the plan says so.
- ``l1`` / ``l2``: mean absolute value / root mean square of every filter
  that produces the channel (Li et al. 2017), normalised by filter size so
  that layers of different fan-in compare in a global ranking.
- ``random``: a seeded uniform baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from secateur.pruner import layout as lay
from secateur.pruner.graph import ChannelGraph, Group, WeightAxis

WeightGetter = Callable[[str, int], np.ndarray]

_FILTER_ROLES = ("out", "depthwise")


@dataclass(frozen=True)
class GroupScore:
    scores: np.ndarray
    criterion: str
    fallback: str | None = None


def _reduce(weight: np.ndarray, axis: int, kind: str) -> np.ndarray:
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    if kind == "l1":
        return np.mean(np.abs(moved), axis=1)
    if kind == "l2":
        return np.sqrt(np.mean(np.square(moved), axis=1))
    return np.abs(moved[:, 0]) if moved.shape[1] == 1 else np.mean(np.abs(moved), axis=1)


def _member_scores(
    graph: ChannelGraph,
    group: Group,
    members: list[WeightAxis],
    kind: str,
    weights: WeightGetter,
) -> np.ndarray | None:
    """Average over members of their per-channel scores for ``group``."""
    in_group = set(group.spaces)
    total = np.zeros(group.size, dtype=np.float64)
    count = 0
    for ax in members:
        per_pos = _reduce(weights(ax.layer, ax.weight), ax.axis, kind)
        owners, channels = lay.position_owner(ax.layout)
        mask = np.isin(owners, list(in_group))
        if not mask.any():
            continue
        acc = np.zeros(group.size, dtype=np.float64)
        hits = np.zeros(group.size, dtype=np.float64)
        np.add.at(acc, channels[mask], per_pos[mask])
        np.add.at(hits, channels[mask], 1.0)
        total += acc / np.maximum(hits, 1.0)
        count += 1
    return total / count if count else None


def score_group(
    graph: ChannelGraph,
    group: Group,
    criterion: str,
    weights: WeightGetter,
    rng: np.random.Generator,
) -> GroupScore:
    """Score the channels of one prunable group.

    Args:
        graph: the traced model.
        group: a prunable group of ``graph``.
        criterion: ``bn_scale``, ``l1``, ``l2`` or ``random``.
        weights: returns a layer's weight ``(path, index)`` as numpy.
        rng: source of the ``random`` criterion.

    Returns:
        Scores (higher = more important) and the criterion actually used.
    """
    if criterion == "random":
        return GroupScore(rng.random(group.size), "random")
    if criterion == "bn_scale":
        bns = [m for m in group.members if m.role == "bn_gamma"]
        scores = _member_scores(graph, group, bns, "abs", weights)
        if scores is not None:
            return GroupScore(scores, "bn_scale")
        fallback = "no BatchNormalization in the group; scored by l1"
        criterion = "l1"
    else:
        fallback = None
    filters = [m for m in group.members if m.role in _FILTER_ROLES]
    scores = _member_scores(graph, group, filters, criterion, weights)
    if scores is None:
        # No filter produces these channels (only consumers): use the inputs'
        # weights of consumers, which still tell how much a channel is used.
        consumers = [m for m in group.members if m.role == "in"]
        scores = _member_scores(graph, group, consumers, criterion, weights)
        fallback = (fallback or "") + "; no producing filter, scored by consumer weights"
    if scores is None:
        scores = np.zeros(group.size)
    return GroupScore(scores, criterion, fallback)
