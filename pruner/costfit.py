"""A measured figure of a pruned model, predicted from the profile of single-group cuts.

The profile (:mod:`costmodel`) measures the model with one group narrowed at a
time. Adding those single-group savings up is wrong twice over: a layer
whose input *and* output groups both shrink is counted as saved twice (its
cost scales with ``f_in * f_out``, not ``f_in + f_out - 1``), and the noise
of every single-group delta is added too; on a loaded CPU the sum exceeded
the whole step and predicted negative step times.

Here the figure is a sum over the model's multiply-add terms (one per
weighted layer call, :class:`~secateur.pruner.graph.FlopTerm`) plus a
remainder no prunable group touches::

    figure(plan) = remainder + sum_t time_t * rho_t(plan)

``rho_t`` is the term's FLOPs at the plan's widths over its full FLOPs,
exact from the graph: the product over the groups it depends on
(``f_in * f_out`` for a convolution, ``f`` for a depthwise one, linear in
``f`` for a concatenation's share). ``time_t >= 0`` is the term's share of
the figure, fitted to the profile's single-group deltas (a single-group cut
is linear in each ``time_t``) by least squares with a ridge towards the
FLOPs-proportional share ``base * flops_t / flops_total`` (the prior a noisy
profile falls back to; :func:`fit_times`). With every ``time_t >= 0``,
``sum time_t <= base`` and ``0 < rho_t <= 1``, a prediction lies in
``(0, 1]`` of the original by construction; the only clamp is that last
guard (fitted times scaled down if, from noise, they exceed the whole
figure).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from secateur.pruner.graph import ChannelGraph, Group
from secateur.pruner.plan import keep_function

#: Ridge weight of the FLOPs prior, per term, against the profile's rows (each
#: a single-group cut with entries ``1 - rho`` in [0, 1]): about one probed
#: width's worth of evidence.
PRIOR_WEIGHT = 0.5


@dataclass(frozen=True)
class Dependence:
    """How a term's FLOPs scale with one group's kept fraction ``f``.

    ``power``: ``f ** k`` (the group on ``k`` axes of the weight, usually 1);
    otherwise linear: ``1 - k * (1 - f)`` (the group is a share ``k`` of a
    concatenated axis).
    """

    power: bool
    k: float

    def __call__(self, f: float) -> float:
        return f**self.k if self.power else 1.0 - self.k * (1.0 - f)


@dataclass
class CostTerms:
    """The multiply-add terms a set of groups reaches, and how each scales."""

    flops: np.ndarray  # full FLOPs per term
    total_flops: float  # the whole model's, terms no group reaches included
    deps: list[dict[int, Dependence]]  # per term: group id -> dependence
    sizes: dict[int, int]  # group id -> full width

    def rho(self, widths: Mapping[int, int]) -> np.ndarray:
        """Each term's FLOPs at ``widths`` (group id -> kept; others full) over full."""
        out = np.ones(len(self.deps))
        for i, dep in enumerate(self.deps):
            for gid, d in dep.items():
                if gid in widths and widths[gid] < self.sizes[gid]:
                    out[i] *= d(widths[gid] / self.sizes[gid])
        return out


def _term_flops(graph: ChannelGraph, kept: object = None) -> np.ndarray:
    shapes = graph.weight_shapes(kept)  # type: ignore[arg-type]
    return np.array(
        [
            2.0 * t.positions * float(np.prod(shapes[(t.layer, t.weight)]))
            if (t.layer, t.weight) in shapes
            else 0.0
            for t in graph.flops
        ]
    )


def cost_terms(graph: ChannelGraph, groups: Sequence[Group]) -> CostTerms:
    """Trace how every multiply-add term scales with each of ``groups``.

    One count per group (the group cut to half, the others full) tells
    whether a term depends on it and how: ``(h/n) ** k`` (exact when the
    group is on ``k`` whole axes) or linear (a share of a concatenated axis).
    """
    full = _term_flops(graph)
    whole = {g.id: np.arange(g.size) for g in graph.groups()}
    reached: dict[int, dict[int, Dependence]] = {}
    for g in groups:
        half = max(1, g.size // 2)
        cut = _term_flops(graph, keep_function(graph, whole | {g.id: np.arange(half)}))
        f = half / g.size
        for i in np.flatnonzero((full > 0) & (cut < full)):
            r = cut[i] / full[i]
            if r <= 0:  # the term vanishes with any cut: treat as quadratic at worst
                dep = Dependence(True, 2.0)
            elif r < f - 1e-9:
                dep = Dependence(True, math.log(r) / math.log(f))
            else:
                dep = Dependence(False, min(1.0, (1.0 - r) / (1.0 - f)))
            reached.setdefault(int(i), {})[g.id] = dep
    order = sorted(reached)
    return CostTerms(
        flops=full[order] if order else np.zeros(0),
        total_flops=float(full.sum()),
        deps=[reached[i] for i in order],
        sizes={g.id: g.size for g in groups},
    )


@dataclass
class TermModel:
    """A figure (step time, latency, memory) as remainder + per-term shares.

    Attributes:
        base: the full model's figure.
        terms: the terms and how they scale.
        fitted: per-term shares fitted to the profile.
        prior: per-term shares in proportion to FLOPs.
        prior_weight: the blend in use (0: fitted, 1: prior).
    """

    base: float
    terms: CostTerms
    fitted: np.ndarray
    prior: np.ndarray
    prior_weight: float = 0.0
    times: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.blend(self.prior_weight)

    def blend(self, weight: float) -> None:
        """Use ``(1 - weight) * fitted + weight * prior`` (both sum to at most ``base``)."""
        self.prior_weight = weight
        self.times = (1.0 - weight) * self.fitted + weight * self.prior

    def figure(self, widths: Mapping[int, int]) -> float:
        """The predicted figure at ``widths`` (group id -> kept width)."""
        rest = self.base - float(self.times.sum())
        return rest + float(self.times @ self.terms.rho(widths))

    def predict(self, widths: Mapping[int, int]) -> float:
        """The predicted figure at ``widths`` as a fraction of the original's."""
        return self.figure(widths) / self.base if self.base > 0 else 1.0

    def saving(self, group: int, width: int) -> float:
        """Saved by ``group`` alone at ``width`` (others full): what the knapsack adds up."""
        return float(self.times @ (1.0 - self.terms.rho({group: width})))


def fit_times(
    terms: CostTerms,
    base: float,
    cuts: Sequence[tuple[int, int, float]],
    prior_weight: float = PRIOR_WEIGHT,
    sweeps: int = 300,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-term shares from single-group cuts: (fitted, FLOPs prior).

    Args:
        terms: from :func:`cost_terms`.
        base: the full model's figure.
        cuts: (group id, kept width, measured figure minus the full model's).
        prior_weight: ridge weight towards the prior, per term.
        sweeps: coordinate-descent sweeps (the problem is small and convex).

    Minimises ``sum (delta + time @ (1 - rho))**2 + w * |time - prior|**2``
    over ``0 <= time <= base``; then, as the last guard, scales the shares
    down if their sum exceeds ``base``.
    """
    prior = base * terms.flops / max(terms.total_flops, 1e-30)
    if not cuts or not len(prior):
        return prior.copy(), prior
    a = np.array([1.0 - terms.rho({gid: w}) for gid, w, _ in cuts])
    y = np.array([-d for _, _, d in cuts])
    t = prior.copy()
    resid = y - a @ t
    norms = (a * a).sum(axis=0) + prior_weight
    for _ in range(sweeps):
        for j in np.flatnonzero(norms > 0):
            col = a[:, j]
            new = (col @ resid + col @ col * t[j] + prior_weight * prior[j]) / norms[j]
            new = min(max(new, 0.0), base)
            resid -= col * (new - t[j])
            t[j] = new
    total = float(t.sum())
    if total > base:
        t *= base / total
    return t, prior
