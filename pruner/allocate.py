"""How many channels each group keeps: by one ratio, or by a budget (knapsack).

:func:`allocate_ratio` is the study's allocation: one ratio of channels,
ranked globally (one threshold) or cut layerwise. :func:`knapsack` chooses a
width per group under a cost budget instead (HALP, Shen et al. 2022): each
group offers legal widths (multiples of ``round_to``, at least
``min_channels``), each width keeps some importance (the sum of its
channels' best scores) and saves some cost; the widths that save at least
the required cost while losing the least importance are found exactly by
dynamic programming over the saving, discretised into ``resolution`` steps
of the requirement, and checked against the exact savings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from secateur.pruner.graph import Group
from secateur.pruner.scoring import GroupScore
from secateur.pruner.spec import PruneSpec


def floor_count(size: int, spec: PruneSpec, unit: int = 1) -> int:
    """Fewest units a group of ``size`` may keep (a unit is ``unit`` channels)."""
    return min(size, -(-spec.min_channels // unit))


def round_count(keep: int, size: int, spec: PruneSpec, unit: int = 1) -> int:
    """Nearest legal kept count: ``keep * unit`` a multiple of round_to, >= the floor."""
    step = int(spec.round_to) // math.gcd(int(spec.round_to), unit)  # resolved by make_plan
    if step > 1:
        keep = max(step, int(round(keep / step)) * step)
        while keep < floor_count(size, spec, unit):
            keep += step
    keep = max(keep, floor_count(size, spec, unit))
    return size if keep >= size else keep


def allocate_ratio(
    groups: list[Group], scores: dict[int, GroupScore], spec: PruneSpec
) -> dict[int, int]:
    """How many channels each prunable group keeps at ``spec.ratio`` (global or layerwise)."""
    if spec.scope == "layerwise":
        return {
            g.id: round_count(g.size - int(round(spec.ratio * g.size)), g.size, spec, g.unit)
            for g in groups
        }
    # Global: rank channels of groups scored by the requested criterion
    # together; scores of other criteria are not comparable, so groups that
    # fell back are cut layerwise at the same ratio.
    pooled = [g for g in groups if scores[g.id].fallback is None]
    out = {
        g.id: round_count(g.size - int(round(spec.ratio * g.size)), g.size, spec, g.unit)
        for g in groups
        if scores[g.id].fallback is not None
    }
    if not pooled:
        return out
    # A unit of a block group (a whole conv group, a head) counts its channels.
    total = sum(g.size * g.unit for g in pooled)
    to_remove = int(round(spec.ratio * total))
    flat = np.concatenate([scores[g.id].scores for g in pooled])
    owner = np.concatenate([np.full(g.size, i) for i, g in enumerate(pooled)])
    # Ties (an untrained model's gammas are all 1) are broken by each
    # channel's relative rank inside its group, so equal scores are removed
    # proportionally across groups instead of emptying the first group.
    rel = np.concatenate([_relative_rank(scores[g.id].scores) for g in pooled])
    removable = np.array([g.size - floor_count(g.size, spec, g.unit) for g in pooled])
    removed = np.zeros(len(pooled), dtype=np.int64)
    for pos in np.lexsort((rel, flat)):
        if to_remove <= 0:
            break
        gi = owner[pos]
        if removed[gi] < removable[gi]:
            removed[gi] += 1
            to_remove -= pooled[gi].unit
    for i, g in enumerate(pooled):
        out[g.id] = round_count(g.size - int(removed[i]), g.size, spec, g.unit)
    return out


def _relative_rank(scores: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[np.argsort(scores, kind="stable")] = np.arange(len(scores))
    return ranks / max(len(scores), 1)


def legal_widths(size: int, spec: PruneSpec, unit: int = 1, most: int = 64) -> list[int]:
    """Kept counts a group of ``size`` may take under ``round_to``/``min_channels``.

    Ascending, ending at ``size``; thinned evenly to at most ``most``
    (the smallest and ``size`` always stay).
    """
    step = int(spec.round_to) // math.gcd(int(spec.round_to), unit)
    low = floor_count(size, spec, unit)
    start = max(step, -(-low // step) * step)
    widths = sorted({*range(start, size, step), size})
    if len(widths) > most:
        picks = np.unique(np.round(np.linspace(0, len(widths) - 1, most)).astype(int))
        widths = [widths[i] for i in picks]
    return widths


@dataclass(frozen=True)
class Option:
    """One width of one group: what it loses and what it saves."""

    width: int
    lost: float
    saving: float


def kept_importance(scores: np.ndarray, widths: Sequence[int]) -> np.ndarray:
    """Importance lost by keeping only the ``w`` best-scored channels, per width."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    total = np.concatenate([[0.0], np.cumsum(ordered)])
    return np.array([total[-1] - total[w] for w in widths])


def knapsack(
    options: Mapping[int, Sequence[Option]], required: float, resolution: int = 1000
) -> dict[int, int] | None:
    """Widths saving at least ``required`` in all with the least importance lost.

    Args:
        options: group id -> its options; each group takes exactly one.
        required: the total saving needed (<= 0: each group takes its
            least lossy option).
        resolution: steps the requirement is discretised into.

    Returns:
        group id -> chosen width, or None when even the largest savings do
        not add up to ``required``. The choice is optimal on the discretised
        savings and is checked on the exact ones: when rounding made it fall
        short, the requirement is raised (twice the shortfall and one step)
        and solved again, up to eight times.
    """
    need = required
    for _ in range(8):
        widths = _solve(options, need, resolution)
        if widths is None:
            return None
        saved = sum(next(o.saving for o in options[g] if o.width == w) for g, w in widths.items())
        if saved >= required - 1e-12 * abs(required):
            return widths
        # Rounding lost up to half a step per group: ask for the shortfall
        # twice over and one more step, so the next optimum is not the same.
        need += 2 * (required - saved) + required / resolution
    return None


def _solve(
    options: Mapping[int, Sequence[Option]], required: float, resolution: int
) -> dict[int, int] | None:
    """The exact optimum of the discretised problem (see :func:`knapsack`)."""
    ids = sorted(options)
    if required <= 0:
        return {g: min(options[g], key=lambda o: (o.lost, -o.width)).width for g in ids}
    steps = resolution
    unit = required / steps
    # dp[j]: least importance lost by the groups so far saving >= j steps (j = steps: all).
    dp = np.full(steps + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((len(ids), steps + 1), dtype=np.int32)
    prev = np.zeros((len(ids), steps + 1), dtype=np.int32)
    for gi, g in enumerate(ids):
        new = np.full(steps + 1, np.inf)
        for oi, opt in enumerate(options[g]):
            u = int(min(steps, max(0, round(opt.saving / unit))))
            cand = np.full(steps + 1, np.inf)
            cand[u:] = dp[: steps + 1 - u] + opt.lost
            back = np.arange(steps + 1) - u
            top = steps - u + int(np.argmin(dp[steps - u :]))  # any j >= steps - u reaches all
            cand[steps], back[steps] = dp[top] + opt.lost, top
            better = cand < new
            new[better], choice[gi, better], prev[gi, better] = cand[better], oi, back[better]
        dp = new
    if not np.isfinite(dp[steps]):
        return None
    out: dict[int, int] = {}
    j = steps
    for gi in range(len(ids) - 1, -1, -1):
        out[ids[gi]] = options[ids[gi]][int(choice[gi, j])].width
        j = int(prev[gi, j])
    return out
