"""Plan to targets: per-group widths that keep the most importance within a budget.

1. Score the model once (the spec's criterion, :func:`plan.score_model`).
2. Cost per group and width: ``params``/``flops`` counted from the graph
   (each group's cost is linear in its width when the others are fixed);
   ``step_time``/``latency``/``peak_memory`` from a profile measured on the
   device (:mod:`costmodel`, cached in the state dir), turned into a model
   of the figure (:mod:`costfit`: per-layer shares scaled by both sides'
   widths plus a constant remainder, in (0, 1] of the original by
   construction). The knapsack adds single-group savings; while the model
   predicts a miss, the requirement is raised and it is solved again.
3. Choose widths by knapsack (:func:`allocate.knapsack`): the least
   importance lost for at least the required saving; with several targets
   the saving is the weighted sum of each metric's saving relative to its
   requirement (all weights 1 at first).
4. Check: params/FLOPs are counted exactly from the plan; measured targets
   are measured on the rebuilt model, interleaved with the original. A
   counted miss doubles the metric's weight and raises its requirement by
   the relative shortfall (iterated until met, deterministically). A
   measured round calibrates the cost model by its prediction over the
   measurement and aims the next plan at the limit; after a measured miss
   the measured per-layer shares are also blended with FLOPs-proportional
   ones (weight 1/2, 3/4, ...: a profile on a noisy device, or costs that
   do not add, misled it). A plan met with more than the tolerance to spare
   is refined the same way while ``Targets.corrections`` rounds remain; the
   met plan losing the least importance wins. A measured plan is only met
   on the mean of two checks (:func:`targetcheck.check`): on ResNet50 one
   8-step check read 0.59 of the original where five later ones read
   0.67 to 0.72. None met:
   :class:`TargetUnreachableError` with the best reached.
5. Every width offered removes at most ``Targets.max_group_ratio`` of a
   group's channels: the knapsack would otherwise strip the costliest
   groups (full-resolution early convolutions) to one channel, whose
   scores do not say what losing the layer costs.

Every target in the plan's ``targets`` carries wanted, predicted and
measured (or counted) fractions of the original, and how they were obtained.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secateur.pruner.allocate import Option, kept_importance, knapsack, legal_widths
from secateur.pruner.costfit import TermModel, cost_terms, fit_times
from secateur.pruner.costmodel import CostProfile, Meter, profile_costs
from secateur.pruner.errors import InvalidSpecError
from secateur.pruner.graph import Group
from secateur.pruner.plan import (
    PruningPlan,
    ScoredModel,
    keep_function,
    plan_from_counts,
    score_model,
)
from secateur.pruner.spec import PruneSpec
from secateur.pruner.targetcheck import check, narrowest, public, unreachable
from secateur.pruner.targets import Target, Targets

#: Rounds for counted-only targets (each is one knapsack and one count).
COUNTED_ROUNDS = 30
#: Knapsack solves per allocation until the cost model predicts the measured targets met.
INNER_ROUNDS = 8


@dataclass
class _Costs:
    """Base figure and per-(group, width) saving of every targeted metric."""

    base: dict[str, float]
    savings: dict[str, dict[int, dict[int, float]]]  # metric -> group id -> width -> saving
    profile: CostProfile | None = None
    #: Measured metric -> its model (remainder + per-term shares; :mod:`costfit`).
    models: dict[str, TermModel] = field(default_factory=dict)
    #: Weight of the FLOPs prior in the measured models' shares.
    prior_weight: float = 0.0

    def trust_prior(self, weight: float, widths: Mapping[int, list[int]]) -> None:
        """Measured shares become ``(1 - weight) * fitted + weight * FLOPs prior``;
        the knapsack's savings are the model's single-group ones."""
        self.prior_weight = weight
        for m, model in self.models.items():
            model.blend(weight)
            self.savings[m] = {g: {w: model.saving(g, w) for w in row} for g, row in widths.items()}


def plan_to_targets(
    model: Any,
    spec: PruneSpec,
    graph: Any = None,
    device_kind: str | None = None,
    data: Iterable[Any] | None = None,
    meter: Meter | None = None,
    state_dir: str | Path | None = None,
) -> PruningPlan:
    """The plan meeting ``spec.targets``, checked by counting or measuring.

    Args:
        model: a functional or Sequential ``keras.Model``.
        spec: a request with ``targets``.
        graph, device_kind, data: as for :func:`make_plan`.
        meter: measures models on the device (default: a
            :class:`~secateur.pruner.meter.DeviceMeter`); unused when only
            params/FLOPs are targeted.
        state_dir: where cost profiles are cached (None: not cached).

    Returns:
        The plan; ``plan.targets`` reports every target.

    Raises:
        TargetUnreachableError: no allocation met a target (best reached attached).
    """
    if spec.targets is None:
        raise InvalidSpecError("plan_to_targets needs targets. Received: targets=None", "targets")
    targets = spec.targets.resolved()
    scored = score_model(model, spec, graph, device_kind, data)
    groups = [g for g in scored.prunable if g.kind == "channels"]
    widths = {g.id: _widths(g, scored.spec, spec.targets.max_group_ratio) for g in groups}
    if any(t.measured for t in targets) and meter is None:
        from secateur.pruner.meter import DeviceMeter  # loads the training stack

        meter = DeviceMeter(latency_batch=spec.targets.latency_batch)
    costs = _costs(scored, groups, widths, targets, meter, state_dir)
    lost = _losses(scored, groups, widths)
    return _search(scored, groups, widths, lost, costs, spec.targets, meter)


def _widths(group: Group, spec: PruneSpec, max_group_ratio: float) -> list[int]:
    """The legal widths that remove at most ``max_group_ratio`` of the group's channels."""
    floor = math.ceil(group.size * (1.0 - max_group_ratio) - 1e-9)
    return [w for w in legal_widths(group.size, spec, group.unit) if w >= floor]


def _losses(
    scored: ScoredModel, groups: list[Group], widths: Mapping[int, list[int]]
) -> dict[int, np.ndarray]:
    """Importance lost per width. Scores of groups that fell back to another
    criterion are rescaled to the pooled mean (their scale is not comparable);
    live channels (infinite scores) are kept by every width offered."""
    pooled = [scored.scores[g.id].scores for g in groups if scored.scores[g.id].fallback is None]
    finite = [s[np.isfinite(s)] for s in pooled if np.isfinite(s).any()]
    mean = float(np.mean(np.concatenate(finite))) if finite else 1.0
    out = {}
    for g in groups:
        s = np.asarray(scored.scores[g.id].scores, dtype=np.float64)
        live = ~np.isfinite(s)
        s = np.where(live, 0.0, s)
        if scored.scores[g.id].fallback is not None and s.mean() > 0:
            s = s * (mean / s.mean())
        out[g.id] = np.where(
            np.array(widths[g.id]) < live.sum(), np.inf, kept_importance(s, widths[g.id])
        )
    return out


def _costs(
    scored: ScoredModel,
    groups: list[Group],
    widths: Mapping[int, list[int]],
    targets: list[Target],
    meter: Meter | None,
    state_dir: str | Path | None,
) -> _Costs:
    base: dict[str, float] = {}
    savings: dict[str, dict[int, dict[int, float]]] = {}
    full = {g.id: np.arange(g.size) for g in scored.graph.groups()}
    params, flops = scored.graph.count()
    counted = {"params": params, "flops": flops}
    for metric in {t.metric for t in targets if not t.measured}:
        base[metric] = float(counted[metric])
        savings[metric] = {}
        for g in groups:  # linear in this group's width while the others are full
            one = dict(full) | {g.id: np.arange(g.size - 1)}
            less = scored.graph.count(keep_function(scored.graph, one))
            per = counted[metric] - less[0 if metric == "params" else 1]
            savings[metric][g.id] = {w: float(per * (g.size - w)) for w in widths[g.id]}
    costs = _Costs(base, savings)
    measured = [t.metric for t in targets if t.measured]
    if measured and meter is not None:
        costs.profile = profile = profile_costs(
            scored.model, scored.graph, groups, scored.spec, measured, meter, state_dir
        )
        terms = cost_terms(scored.graph, groups)
        for m in measured:
            base[m] = profile.base[m]
            fitted, prior = fit_times(terms, base[m], profile.cuts(groups, m))
            costs.models[m] = TermModel(base[m], terms, fitted, prior)
        costs.trust_prior(0.0, widths)
    return costs


def _search(
    scored: ScoredModel,
    groups: list[Group],
    widths: Mapping[int, list[int]],
    lost: Mapping[int, np.ndarray],
    costs: _Costs,
    settings: Targets,
    meter: Meter | None,
) -> PruningPlan:
    """Allocate, check, correct.

    Counted targets only: the first plan that meets them (deterministic).
    Measured targets: each measured round calibrates the cost model by the
    ratio of its prediction to the measurement (a secant through the
    origin), aiming the next plan at the limit itself; a plan that meets
    the targets with more than the tolerance to spare is refined the same
    way while rounds remain, and of the plans that met, the one losing the
    least importance is returned (overshooting a step-time target costs
    accuracy for nothing).
    """
    targets = settings.resolved()
    required = {t.metric: costs.base[t.metric] - t.limit(costs.base[t.metric]) for t in targets}
    # Several targets share one knapsack: each saving is normalised by its
    # metric's requirement and weighted; a missed metric's weight doubles.
    # ``share`` scales a metric's requirement: counted ones grow by their
    # relative shortfall; measured ones are set by the calibration.
    weight = dict.fromkeys(required, 1.0)
    share = dict.fromkeys(required, 1.0)
    measuring = meter is not None and any(t.measured for t in targets)
    rounds = 1 + settings.corrections if measuring else COUNTED_ROUNDS
    attempts: list[list[dict[str, Any]]] = []
    best, met, tried, misses = None, None, [], 0
    for _ in range(rounds):
        counts = _allocate(groups, widths, lost, costs, required, weight, share)
        if counts is None or (measuring and counts in tried):
            break  # measuring the same plan again tells nothing new
        tried.append(counts)
        plan = plan_from_counts(scored, counts)
        report = check(scored, plan, counts, costs.models, targets, meter, settings.tolerance)
        if measuring and max(r["excess"] for r in report) <= 0:  # confirmed by a second check
            report = check(
                scored, plan, counts, costs.models, targets, meter, settings.tolerance, report
            )
        attempts.append(report)
        excess = max(r["excess"] for r in report)
        if best is None or excess < best[0]:
            best = (excess, plan, report)
        if excess <= 0:
            loss = _lost(lost, widths, counts)
            if met is None or loss < met[0]:
                met = (loss, plan, report, costs.prior_weight)
            if not measuring or not _spare(report):
                break
        misses = _correct(report, counts, costs, widths, required, weight, share, misses)
    if met is not None:
        _, plan, report, prior = met
        plan.targets = [public(r, costs.profile, attempts, prior) for r in report]
        return plan
    raise unreachable(targets, best, attempts, narrowest(scored, widths, costs.models, targets))


def _correct(
    report: list[dict[str, Any]],
    counts: Mapping[int, int],
    costs: _Costs,
    widths: Mapping[int, list[int]],
    required: Mapping[str, float],
    weight: dict[str, float],
    share: dict[str, float],
    misses: int,
) -> int:
    """Adjust weights, requirements and the cost model after one checked plan;
    returns the count of measured misses so far."""
    missed = [r for r in report if r["excess"] > 0]
    for r in missed:
        weight[r["metric"]] *= 2.0
        if r["metric"] not in costs.models:
            share[r["metric"]] *= 1 + r["excess"] + 1e-9
    if any(r["metric"] in costs.models for r in missed):
        # A measured miss means the profile misled (noise, costs that do
        # not add): lean on FLOPs-proportional savings, half as much again.
        misses += 1
        costs.trust_prior(1.0 - 0.5**misses, widths)
    for r in report:
        model = costs.models.get(r["metric"])
        if model is not None:
            share[r["metric"]] = _calibrated(model, r, counts, required[r["metric"]])
    return misses


def _lost(lost: Mapping[int, np.ndarray], widths: Mapping[int, list[int]], counts: Any) -> float:
    return float(sum(lost[g][widths[g].index(w)] for g, w in counts.items()))


def _spare(report: list[dict[str, Any]]) -> bool:
    """Whether every measured figure is below its limit by more than the tolerance."""
    measured = [r for r in report if r["metric"] not in ("params", "flops")]
    return bool(measured) and all(
        r["actual"] * r["original"] < r["limit"] * (1 - max(r["tolerance"], 0.01)) for r in measured
    )


def _calibrated(
    model: TermModel, r: dict[str, Any], counts: Mapping[int, int], required: float
) -> float:
    """The share of ``required`` to aim for so that the next plan measures just under the limit.

    The model (as it now stands) predicts ``p`` for the last plan measured at
    ``a``; assuming the same relative error nearby (a secant through the
    origin), a figure ``g`` is measured where the model predicts ``g * p / a``.
    The aim ``g`` is half the tolerance below the limit, so a re-measurement
    of the plan (the job's MEASURING stage makes one) stays within it. A
    secant through the last two plans was tried and extrapolated noise: on
    the digits VGG it jumped from a prediction of 0.51 to 0.14 (measured
    0.47 against a 0.6 target).
    """
    goal = r["limit"] / r["original"] * (1.0 - r["tolerance"] / 2)
    p, a = model.predict(counts), max(r["actual"], 1e-9)
    aim = min(max(goal * p / a, 0.01), 0.999)
    return max(model.base * (1.0 - aim), 1e-12) / max(required, 1e-12)


def _allocate(
    groups: list[Group],
    widths: Mapping[int, list[int]],
    lost: Mapping[int, np.ndarray],
    costs: _Costs,
    required: Mapping[str, float],
    weight: Mapping[str, float],
    share: Mapping[str, float],
) -> dict[int, int] | None:
    """Knapsack widths whose measured metrics the cost model predicts to meet.

    The knapsack adds single-group savings, which over-counts a layer both of
    whose sides shrink; the model (:mod:`costfit`) does not. While the model
    predicts a measured metric short of its (corrected) requirement, that
    metric's part of the requirement is raised by the shortfall and the
    knapsack solved again, so the plan measured is one its reported
    prediction says meets the target. When no widths satisfy the model, the
    last feasible plan is measured anyway: the measurement decides.
    """
    inner = dict.fromkeys(required, 1.0)
    found = None
    for _ in range(INNER_ROUNDS):
        options = {
            g.id: [
                Option(w, float(lost[g.id][i]), _saving(costs, required, weight, g.id, w))
                for i, w in enumerate(widths[g.id])
                if np.isfinite(lost[g.id][i])
            ]
            for g in groups
        }
        need = sum(weight[m] * share[m] * inner[m] for m in required if required[m] > 0)
        counts = knapsack(options, need)
        if counts is None:
            return found
        found = counts
        short = False
        for m, model in costs.models.items():
            wanted = required[m] * share[m]
            saved = model.base - model.figure(counts)
            if wanted > 0 and saved < wanted * (1 - 1e-9):
                inner[m] *= min(2.0, wanted / max(saved, 1e-12 * wanted)) + 1e-3
                short = True
        if not short:
            break
    return found


def _saving(
    costs: _Costs,
    required: Mapping[str, float],
    weight: Mapping[str, float],
    group: int,
    width: int,
) -> float:
    """The weighted sum of one width's savings, each relative to its metric's requirement."""
    return sum(
        weight[m] * costs.savings[m][group][width] / need if need > 0 else 0.0
        for m, need in required.items()
    )
