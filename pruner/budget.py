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
   are measured on the rebuilt model, interleaved with the original. A miss
   doubles the missed metric's weight, raises its requirement by the
   relative shortfall and solves again; after a measured miss the measured
   per-layer shares are blended with FLOPs-proportional ones (weight 1/2, 3/4, ...:
   a profile on a noisy device, or costs that do not add, misled it)
   (``Targets.corrections`` rounds for measured targets; counted ones iterate
   until met, deterministically). Still missed: :class:`TargetUnreachableError`
   with the best reached.

Every target in the plan's ``targets`` carries wanted, predicted and
measured (or counted) fractions of the original, and how they were obtained.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secateur.pruner.allocate import Option, kept_importance, knapsack, legal_widths
from secateur.pruner.costfit import TermModel, cost_terms, fit_times
from secateur.pruner.costmodel import CostProfile, Meter, profile_costs
from secateur.pruner.errors import InvalidSpecError, TargetUnreachableError
from secateur.pruner.graph import Group
from secateur.pruner.plan import (
    PruningPlan,
    ScoredModel,
    keep_function,
    plan_from_counts,
    score_model,
)
from secateur.pruner.spec import PruneSpec
from secateur.pruner.surgery import apply_plan
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

    def trust_prior(self, weight: float, widths: Mapping[int, list[int]]) -> None:
        """Measured shares become ``(1 - weight) * fitted + weight * FLOPs prior``;
        the knapsack's savings are the model's single-group ones."""
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
    widths = {g.id: legal_widths(g.size, scored.spec, g.unit) for g in groups}
    if any(t.measured for t in targets) and meter is None:
        from secateur.pruner.meter import DeviceMeter  # loads the training stack

        meter = DeviceMeter(latency_batch=spec.targets.latency_batch)
    costs = _costs(scored, groups, widths, targets, meter, state_dir)
    lost = _losses(scored, groups, widths)
    return _search(scored, groups, widths, lost, costs, spec.targets, meter)


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
    """Allocate, check, correct; the first plan that meets every target."""
    targets = settings.resolved()
    required = {t.metric: costs.base[t.metric] - t.limit(costs.base[t.metric]) for t in targets}
    # Several targets share one knapsack: each saving is normalised by its
    # metric's requirement and weighted; a missed metric's weight doubles and
    # its share of the requirement grows by its relative shortfall.
    weight = dict.fromkeys(required, 1.0)
    share = dict.fromkeys(required, 1.0)
    rounds = (
        1 + settings.corrections
        if meter is not None and any(t.measured for t in targets)
        else COUNTED_ROUNDS
    )
    attempts, best = [], None
    for _ in range(rounds):
        counts = _allocate(groups, widths, lost, costs, required, weight, share)
        if counts is None:
            break
        plan = plan_from_counts(scored, counts)
        report = _check(scored, plan, counts, costs, targets, meter, settings.tolerance)
        attempts.append(report)
        excess = max(r["excess"] for r in report)
        if best is None or excess < best[0]:
            best = (excess, plan, report)
        if excess <= 0:
            plan.targets = [_public(r, costs, len(attempts)) for r in report]
            return plan
        for r in report:
            if r["excess"] > 0:
                weight[r["metric"]] *= 2.0
                share[r["metric"]] *= 1 + r["excess"] + 1e-9
        # A measured miss means the profile misled (noise, costs that do not
        # add): lean on FLOPs-proportional savings, half as much again each round.
        trust = 1.0 - 0.5 ** (len(attempts))
        costs.trust_prior(trust, widths)
    raise _unreachable(targets, best, attempts)


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


def _check(
    scored: ScoredModel,
    plan: PruningPlan,
    counts: Mapping[int, int],
    costs: _Costs,
    targets: list[Target],
    meter: Meter | None,
    tolerance: float,
) -> list[dict[str, Any]]:
    """Predicted and actual figure of every target for one plan."""
    actual = {"params": float(plan.params_after), "flops": float(plan.flops_after)}
    originals = {"params": float(plan.params_before), "flops": float(plan.flops_before)}
    measured = [t.metric for t in targets if t.measured]
    if measured and meter is not None:
        pruned = apply_plan(scored.model, plan)
        figures = meter.measure({"original": scored.model, "pruned": pruned}, measured)
        actual |= figures["pruned"]
        originals |= figures["original"]
    out = []
    for t in targets:
        model = costs.models.get(t.metric)
        # Measured: the cost model's figure; counted: the exact count.
        predicted = (
            model.predict(counts)
            if model is not None
            else float(actual[t.metric]) / originals[t.metric]
        )
        limit = t.limit(originals[t.metric])
        slack = tolerance if t.measured else 0.0
        required = max(originals[t.metric] - limit, 1e-12)
        out.append(
            {
                "metric": t.metric,
                "wanted": t.fraction if t.fraction is not None else t.absolute,
                "absolute": t.fraction is None,
                "predicted": predicted,
                "actual": float(actual[t.metric]) / originals[t.metric],
                "original": float(originals[t.metric]),
                "limit": limit,
                "excess": (float(actual[t.metric]) - limit * (1 + slack)) / required,
                "tolerance": slack,
            }
        )
    return out


def _public(r: dict[str, Any], costs: _Costs, rounds: int) -> dict[str, Any]:
    measured = r["metric"] not in ("params", "flops")
    how: dict[str, Any] = {"rounds": rounds}
    if measured and costs.profile is not None:
        how |= costs.profile.how | {
            "profile_measurements": costs.profile.measurements,
            "profile_seconds": round(costs.profile.seconds, 2),
            "profile_cached": costs.profile.cached,
            # Share of the savings taken in proportion to FLOPs instead of the profile.
            "flops_prior_weight": 1.0 - 0.5 ** (rounds - 1),
            "tolerance": r["tolerance"],
        }
    else:
        how["method"] = "counted from the plan (exact)"
    return {
        "metric": r["metric"],
        "wanted": r["wanted"],
        "wanted_absolute": r["absolute"],
        "predicted": r["predicted"],
        "measured": r["actual"],
        "met": r["excess"] <= 0,
        "how": how,
    }


def _unreachable(
    targets: list[Target], best: Any, attempts: list[list[dict[str, Any]]]
) -> TargetUnreachableError:
    if best is None:
        t = targets[0]
        return TargetUnreachableError(
            f"no widths the spec allows (round_to, min_channels, frozen groups) save enough "
            f"to meet the {t.metric} target. Received: {t.metric} target "
            f"{t.fraction if t.fraction is not None else t.absolute}",
            t.metric,
            t.fraction,
            None,
            [],
        )
    worst = max(best[2], key=lambda r: r["excess"])
    return TargetUnreachableError(
        f"the {worst['metric']} target of {worst['wanted']} was not met after "
        f"{len(attempts)} allocation(s). Received: best reached {worst['actual']:.3f} "
        f"of the original (predicted {worst['predicted']})",
        worst["metric"],
        worst["wanted"],
        worst["actual"],
        [{r["metric"]: (r["predicted"], r["actual"]) for r in a} for a in attempts],
    )
