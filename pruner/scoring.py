"""Channel importance: one score per channel of every prunable group.

Criteria live in a registry, the way layer handlers do
(:mod:`secateur.pruner.handlers`): a criterion is one function from a
:class:`GroupView` to a :class:`GroupScore`, registered under its name with
:func:`register_criterion`. :func:`criteria` lists the names; the spec
validates against it. (The CLI's ``--criterion`` choices, the proto's
``Criterion`` enum and ``server/convert.py``'s enum map are still written
out by hand; they are where the registry would be read once the request
schema is derived from one source.)

Built-in criteria:

- ``bn_scale``: |gamma| of the BatchNormalization layers in the group
  (Network Slimming, Liu et al. 2017). Raw magnitudes, so that a global
  threshold compares layers, as the paper does. Groups without BatchNorm
  fall back to ``l1`` and the plan says so.
- ``l1`` / ``l2``: mean absolute value / root mean square of every filter
  that produces the channel (Li et al. 2017), normalised by filter size so
  that layers of different fan-in compare in a global ranking.
- ``random``: a seeded uniform baseline.

This module loads no TensorFlow: the spec imports it to validate names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from secateur.pruner import layout as lay
from secateur.pruner.errors import InvalidSpecError

if TYPE_CHECKING:
    from secateur.pruner.graph import ChannelGraph, Group, WeightAxis

WeightGetter = Callable[[str, int], np.ndarray]
Reduce = Callable[[np.ndarray], np.ndarray]

_FILTER_ROLES = ("out", "depthwise")


@dataclass(frozen=True)
class GroupScore:
    scores: np.ndarray
    criterion: str
    fallback: str | None = None


@dataclass(frozen=True)
class GroupView:
    """What a criterion sees of one prunable group.

    Attributes:
        graph: the traced model.
        group: the group to score; ``group.members`` are its weight axes.
        weights: returns a layer's weight ``(path, index)`` as numpy.
        rng: the spec's seeded generator (shared by all groups, in order).
    """

    graph: ChannelGraph
    group: Group
    weights: WeightGetter
    rng: np.random.Generator

    def members(self, roles: Iterable[str]) -> list[WeightAxis]:
        wanted = set(roles)
        return [m for m in self.group.members if m.role in wanted]

    def mean_over(self, members: list[WeightAxis], reduce: Reduce) -> np.ndarray | None:
        """Average over ``members`` of their per-channel scores for the group.

        Args:
            members: weight axes of the group.
            reduce: maps a ``(positions, rest)`` matrix (the weight with the
                member's axis moved first, flattened) to one score per position.

        Returns:
            One score per channel of the group, or None when no member
            covers the group's channels.
        """
        in_group = list(set(self.group.spaces))
        total = np.zeros(self.group.size, dtype=np.float64)
        count = 0
        for ax in members:
            weight = self.weights(ax.layer, ax.weight)
            moved = np.moveaxis(weight, ax.axis, 0).reshape(weight.shape[ax.axis], -1)
            per_pos = reduce(moved)
            owners, channels = lay.position_owner(ax.layout)
            mask = np.isin(owners, in_group)
            if not mask.any():
                continue
            acc = np.zeros(self.group.size, dtype=np.float64)
            hits = np.zeros(self.group.size, dtype=np.float64)
            np.add.at(acc, channels[mask], per_pos[mask])
            np.add.at(hits, channels[mask], 1.0)
            total += acc / np.maximum(hits, 1.0)
            count += 1
        return total / count if count else None


Criterion = Callable[[GroupView], GroupScore]
_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Register ``fn`` as the importance criterion called ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(fn: Criterion) -> Criterion:
        if name in _CRITERIA:
            raise ValueError(f"criterion names must be unique. Received: {name!r} twice")
        _CRITERIA[name] = fn
        return fn

    return deco


def criteria() -> tuple[str, ...]:
    """Names of every registered criterion, in registration order."""
    return tuple(_CRITERIA)


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
        criterion: a name from :func:`criteria`.
        weights: returns a layer's weight ``(path, index)`` as numpy.
        rng: source of the ``random`` criterion.

    Returns:
        Scores (higher = more important) and the criterion actually used.

    Raises:
        InvalidSpecError: ``criterion`` is not registered.
    """
    fn = _CRITERIA.get(criterion)
    if fn is None:
        raise InvalidSpecError(
            f"criterion must be one of {', '.join(criteria())}. Received: criterion={criterion!r}",
            "criterion",
        )
    return fn(GroupView(graph, group, weights, rng))


# -- reductions over one weight's filters ------------------------------------


def _l1(moved: np.ndarray) -> np.ndarray:
    return np.mean(np.abs(moved), axis=1)


def _l2(moved: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(np.square(moved), axis=1))


def _abs(moved: np.ndarray) -> np.ndarray:
    return np.abs(moved[:, 0]) if moved.shape[1] == 1 else _l1(moved)


def _magnitude(view: GroupView, name: str, reduce: Reduce, fallback: str | None) -> GroupScore:
    """Score by the filters that produce each channel, else by its consumers."""
    scores = view.mean_over(view.members(_FILTER_ROLES), reduce)
    if scores is None:
        # No filter produces these channels (only consumers): use the inputs'
        # weights of consumers, which still tell how much a channel is used.
        scores = view.mean_over(view.members(["in"]), reduce)
        fallback = (fallback or "") + "; no producing filter, scored by consumer weights"
    if scores is None:
        scores = np.zeros(view.group.size)
    return GroupScore(scores, name, fallback)


# -- the built-in criteria ---------------------------------------------------


@register_criterion("bn_scale")
def bn_scale(view: GroupView) -> GroupScore:
    """|gamma| of the group's BatchNorms; l1 where the group has none."""
    scores = view.mean_over(view.members(["bn_gamma"]), _abs)
    if scores is not None:
        return GroupScore(scores, "bn_scale")
    return _magnitude(view, "l1", _l1, "no BatchNormalization in the group; scored by l1")


@register_criterion("l1")
def l1(view: GroupView) -> GroupScore:
    """Mean |w| of the filters producing each channel."""
    return _magnitude(view, "l1", _l1, None)


@register_criterion("l2")
def l2(view: GroupView) -> GroupScore:
    """Root mean square of the filters producing each channel."""
    return _magnitude(view, "l2", _l2, None)


@register_criterion("random")
def random(view: GroupView) -> GroupScore:
    """Seeded uniform scores, the baseline."""
    return GroupScore(view.rng.random(view.group.size), "random")
