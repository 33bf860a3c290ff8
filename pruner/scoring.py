"""Channel importance: one score per channel of every prunable group.

Criteria live in a registry, the way layer handlers do
(:mod:`secateur.pruner.handlers`): a criterion is one function from a
:class:`GroupView` to a :class:`GroupScore`, registered under its name with
:func:`register_criterion`. :func:`criteria` lists the names; the spec
validates against it. (The CLI's ``--criterion`` choices, the proto's
``Criterion`` enum and ``server/pipeline/convert.py``'s enum map are still written
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
- ``lamp``: layer-adaptive magnitude (Lee et al. 2021): each channel's
  squared filter norm over the sum of the not-smaller ones of its group, so
  every group's scores lie in (0, 1] and a global ranking compares layers.
- ``taylor``: first-order Taylor importance (Molchanov et al.): per example,
  |sum over positions of activation x gradient of the loss| at the channel's
  producer (its BatchNorm's output, else its filter's), summed over the
  examples of ``PruneSpec.taylor_batches`` training batches, then divided
  by the group's L2 norm (Molchanov et al. 2017's per-layer normalisation):
  the raw sums estimate removing one channel alone and do not add up, and
  ranked globally they emptied whole layers (the CIFAR VGG's redundant,
  dropout-trained fc1 kept 1 of 64 channels at 30%). Needs data: a
  :class:`ScoringContext` (``make_plan(..., data=...)``).

Groups of attention heads (``group.kind == "heads"``) are scored by the same
functions: ``l1``/``l2``/``lamp`` read each head's slices of the query, key,
value (gate) and output kernels, ``random`` is unchanged; ``bn_scale`` (heads
have no BatchNorm) and ``taylor`` (it differentiates layer outputs, which
are channels, not heads) fall back to ``l1`` and the plan says so.

This module loads no TensorFlow: the spec imports it to validate names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from secateur.pruner import layout as lay
from secateur.pruner.errors import InvalidSpecError

if TYPE_CHECKING:
    from secateur.pruner.graph import ChannelGraph, Group, WeightAxis

WeightGetter = Callable[[str, int], np.ndarray]
Reduce = Callable[[np.ndarray], np.ndarray]

_FILTER_ROLES = ("out", "depthwise")
_HEADS_BY_L1 = "attention heads {}; scored by l1 of their query/key/value/output weights"


@dataclass(frozen=True)
class GroupScore:
    scores: np.ndarray
    criterion: str
    fallback: str | None = None


@dataclass(frozen=True)
class ScoringContext:
    """What data-driven criteria see beyond the weights.

    Attributes:
        model: the ``keras.Model`` being scored.
        data: ``(inputs, labels)`` training batches (a ``tf.data.Dataset`` or
            any iterable), or None when the caller has none.
        batches: how many of them a criterion may read.
    """

    model: Any
    data: Iterable[Any] | None = None
    batches: int = 8
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per context: every group shares one pass over the data."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


@dataclass(frozen=True)
class GroupView:
    """What a criterion sees of one prunable group.

    Attributes:
        graph: the traced model.
        group: the group to score; ``group.members`` are its weight axes.
        weights: returns a layer's weight ``(path, index)`` as numpy.
        rng: the spec's seeded generator (shared by all groups, in order).
        context: the model and data, for criteria that need them.
    """

    graph: ChannelGraph
    group: Group
    weights: WeightGetter
    rng: np.random.Generator
    context: ScoringContext | None = None

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

        def per_pos(ax: WeightAxis) -> np.ndarray:
            weight = self.weights(ax.layer, ax.weight)
            return reduce(np.moveaxis(weight, ax.axis, 0).reshape(weight.shape[ax.axis], -1))

        return self.mean_of(members, per_pos)

    def mean_of(
        self, members: list[WeightAxis], per_pos: Callable[[WeightAxis], np.ndarray]
    ) -> np.ndarray | None:
        """Average over ``members`` of per-position values mapped to the group's channels.

        Args:
            members: weight axes of the group.
            per_pos: one value per position of a member's layout.

        Returns:
            One value per channel of the group, or None when no member covers it.
        """
        in_group = list(set(self.group.spaces))
        total = np.zeros(self.group.size, dtype=np.float64)
        count = 0
        for ax in members:
            values = per_pos(ax)
            owners, channels = lay.position_owner(ax.layout)
            mask = np.isin(owners, in_group)
            if not mask.any():
                continue
            acc = np.zeros(self.group.size, dtype=np.float64)
            hits = np.zeros(self.group.size, dtype=np.float64)
            np.add.at(acc, channels[mask], values[mask])
            np.add.at(hits, channels[mask], 1.0)
            total += acc / np.maximum(hits, 1.0)
            count += 1
        return total / count if count else None


Criterion = Callable[[GroupView], GroupScore]
_CRITERIA: dict[str, Criterion] = {}
_NEEDS_DATA: set[str] = set()


def register_criterion(name: str, needs_data: bool = False) -> Callable[[Criterion], Criterion]:
    """Register ``fn`` as the importance criterion called ``name``.

    Args:
        name: the criterion's name in specs, the CLI and the contract.
        needs_data: the criterion reads training batches (a ScoringContext
            with data); requests without training data are refused.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(fn: Criterion) -> Criterion:
        if name in _CRITERIA:
            raise ValueError(f"criterion names must be unique. Received: {name!r} twice")
        _CRITERIA[name] = fn
        if needs_data:
            _NEEDS_DATA.add(name)
        return fn

    return deco


def criteria() -> tuple[str, ...]:
    """Names of every registered criterion, in registration order."""
    return tuple(_CRITERIA)


def needs_data(name: str) -> bool:
    """True when criterion ``name`` reads training data."""
    return name in _NEEDS_DATA


def require_data(criterion: str, has_data: bool) -> None:
    """Refuse a data-driven criterion without training data.

    Raises:
        InvalidSpecError: ``criterion`` needs data and there is none.
    """
    if needs_data(criterion) and not has_data:
        raise InvalidSpecError(
            f"criterion {criterion} needs training data (train_data) to compute "
            f"gradients. Received: criterion={criterion!r} and no train_data",
            "criterion",
        )


def score_group(
    graph: ChannelGraph,
    group: Group,
    criterion: str,
    weights: WeightGetter,
    rng: np.random.Generator,
    context: ScoringContext | None = None,
) -> GroupScore:
    """Score the channels of one prunable group.

    Args:
        graph: the traced model.
        group: a prunable group of ``graph``.
        criterion: a name from :func:`criteria`.
        weights: returns a layer's weight ``(path, index)`` as numpy.
        rng: source of the ``random`` criterion.
        context: the model and data of data-driven criteria (``taylor``).

    Returns:
        Scores (higher = more important) and the criterion actually used.

    Raises:
        InvalidSpecError: ``criterion`` is not registered, or needs data
            that ``context`` lacks.
    """
    fn = _CRITERIA.get(criterion)
    if fn is None:
        raise InvalidSpecError(
            f"criterion must be one of {', '.join(criteria())}. Received: criterion={criterion!r}",
            "criterion",
        )
    require_data(criterion, context is not None and context.data is not None)
    return fn(GroupView(graph, group, weights, rng, context))


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
    if view.group.kind == "heads":
        return _magnitude(view, "l1", _l1, _HEADS_BY_L1.format("have no BatchNormalization"))
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


def _sum_squares(moved: np.ndarray) -> np.ndarray:
    return np.sum(np.square(moved.astype(np.float64)), axis=1)


def lamp_normalise(values: np.ndarray) -> np.ndarray:
    """LAMP scores: ``v_i / sum of v_j over j at or after i in ascending order``."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    tail = np.cumsum(values[order][::-1])[::-1]  # sum over the not-smaller ones
    out = np.empty_like(values)
    out[order] = np.divide(values[order], tail, out=np.ones_like(tail), where=tail > 0)
    return out


def l2_normalise(values: np.ndarray) -> np.ndarray:
    """``values`` over their Euclidean norm (all zeros stay zeros): Molchanov et al.'s
    per-layer normalisation, which makes a global ranking compare layers."""
    values = np.asarray(values, dtype=np.float64)
    norm = float(np.sqrt(np.sum(np.square(values))))
    return values / norm if norm > 0 else values


@register_criterion("lamp")
def lamp(view: GroupView) -> GroupScore:
    """Squared filter norms normalised within the group (Lee et al. 2021)."""
    base = _magnitude(view, "lamp", _sum_squares, None)
    return GroupScore(lamp_normalise(base.scores), "lamp", base.fallback)


@register_criterion("taylor", needs_data=True)
def taylor(view: GroupView) -> GroupScore:
    """|activation x gradient| at the channel's producer, over training batches."""
    from secateur.pruner.taylor import taylor_scores  # TensorFlow, loaded on use

    if view.group.kind == "heads":
        reason = "have no output of their own to differentiate (taylor scores layer outputs)"
        return _magnitude(view, "l1", _l1, _HEADS_BY_L1.format(reason))
    ctx = view.context
    assert ctx is not None  # score_group refused a context without data
    per_layer: dict[str, np.ndarray] = ctx.cached(
        "taylor", lambda: taylor_scores(ctx.model, view.graph, ctx.data, ctx.batches)
    )
    members = view.members(["bn_gamma"]) or view.members(_FILTER_ROLES)
    members = [m for m in members if m.layer in per_layer]
    scores = view.mean_of(members, lambda ax: per_layer[ax.layer]) if members else None
    if scores is None:
        return _magnitude(view, "l1", _l1, "no producing layer output to differentiate; by l1")
    return GroupScore(l2_normalise(scores), "taylor")
