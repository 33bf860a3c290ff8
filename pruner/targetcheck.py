"""A plan against its targets: the check, the reported figures, the error when none met.

Counted targets (``params``, ``flops``) are counted exactly from the plan;
measured ones are measured on the rebuilt model, interleaved with the
original (:class:`costmodel.Meter`). :func:`check` gives, per target, the
cost model's prediction, the figure, the limit and the excess over it
(:mod:`budget` searches on these); :func:`public` is what a plan reports;
:func:`unreachable` is the :class:`TargetUnreachableError` with the best
reached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from secateur.pruner.costfit import TermModel
from secateur.pruner.costmodel import CostProfile, Meter
from secateur.pruner.errors import TargetUnreachableError
from secateur.pruner.plan import PruningPlan, ScoredModel, plan_from_counts
from secateur.pruner.surgery import apply_plan
from secateur.pruner.targets import Target


def check(
    scored: ScoredModel,
    plan: PruningPlan,
    counts: Mapping[int, int],
    models: Mapping[str, TermModel],
    targets: list[Target],
    meter: Meter | None,
    tolerance: float,
    earlier: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Predicted and actual figure of every target for one plan.

    ``earlier``: this plan's previous check. Its measured figures are then
    the mean of both measurements (``checks`` lists each): a plan is only
    accepted on two, since one short measurement on a busy device can
    read 0.1 of the original's step low.
    """
    actual = {"params": float(plan.params_after), "flops": float(plan.flops_after)}
    originals = {"params": float(plan.params_before), "flops": float(plan.flops_before)}
    measured = [t.metric for t in targets if t.measured]
    if measured and meter is not None:
        pruned = apply_plan(scored.model, plan)
        figures = meter.measure({"original": scored.model, "pruned": pruned}, measured)
        actual |= figures["pruned"]
        originals |= figures["original"]
    before = {r["metric"]: r for r in earlier or []}
    out = []
    for t in targets:
        model = models.get(t.metric)
        fraction, original = float(actual[t.metric]) / originals[t.metric], originals[t.metric]
        checks = [fraction]
        if t.measured and t.metric in before:
            checks = [*before[t.metric]["checks"], fraction]
            fraction = float(np.mean(checks))
            original = (original + before[t.metric]["original"]) / 2
        # Measured: the cost model's figure; counted: the exact count.
        predicted = model.predict(counts) if model is not None else fraction
        limit = t.limit(original)
        slack = tolerance if t.measured else 0.0
        required = max(original - limit, 1e-12)
        out.append(
            {
                "metric": t.metric,
                "wanted": t.fraction if t.fraction is not None else t.absolute,
                "absolute": t.fraction is None,
                "predicted": predicted,
                "actual": fraction,
                "checks": checks,
                "original": float(original),
                "limit": limit,
                "excess": (fraction * original - limit * (1 + slack)) / required,
                "tolerance": slack,
            }
        )
    return out


def public(
    r: dict[str, Any],
    profile: CostProfile | None,
    attempts: list[list[dict[str, Any]]],
    prior: float,
) -> dict[str, Any]:
    """One target's entry in ``plan.targets``: wanted, predicted, measured, met and how."""
    measured = r["metric"] not in ("params", "flops")
    how: dict[str, Any] = {"rounds": len(attempts)}
    if measured and profile is not None:
        how |= profile.how | {
            "profile_measurements": profile.measurements,
            "profile_seconds": round(profile.seconds, 2),
            "profile_cached": profile.cached,
            # Share of the savings taken in proportion to FLOPs instead of the profile.
            "flops_prior_weight": prior,
            # Every round's (predicted, measured) fraction; the plan kept is
            # the met one losing the least importance.
            "rounds_figures": [
                [a["predicted"], a["actual"]]
                for rs in attempts
                for a in rs
                if a["metric"] == r["metric"]
            ],
            # The kept plan's measurements (it is accepted on their mean).
            "checks": r["checks"],
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


def narrowest(
    scored: ScoredModel,
    widths: Mapping[int, list[int]],
    models: Mapping[str, TermModel],
    targets: list[Target],
) -> dict[str, tuple[float, str]]:
    """Each target's figure at the narrowest widths allowed: counted, or predicted."""
    counts = {g: row[0] for g, row in widths.items() if row}
    plan = plan_from_counts(scored, counts)
    at = "at the narrowest widths allowed"
    out = {
        "params": (plan.params_after / max(plan.params_before, 1), f"counted {at}"),
        "flops": (plan.flops_after / max(plan.flops_before, 1), f"counted {at}"),
    }
    for m, model in models.items():
        out[m] = (model.predict(counts), f"predicted {at}")
    return {t.metric: out[t.metric] for t in targets if t.metric in out}


def unreachable(
    targets: list[Target],
    best: Any,
    attempts: list[list[dict[str, Any]]],
    narrowest: Mapping[str, tuple[float, str]],
) -> TargetUnreachableError:
    """The error for targets no plan met: the best reached, and every attempt."""
    if best is None:
        t = targets[0]
        figure, how = narrowest.get(t.metric, (None, ""))
        reached = "" if figure is None else f"; best reached {figure:.3f} of the original ({how})"
        return TargetUnreachableError(
            f"no widths the spec allows (round_to, min_channels, max_group_ratio, frozen "
            f"groups) save enough to meet the {t.metric} target. Received: {t.metric} target "
            f"{t.fraction if t.fraction is not None else t.absolute}{reached}",
            t.metric,
            t.fraction,
            figure,
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
