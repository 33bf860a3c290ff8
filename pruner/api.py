"""The one-call entry point: ``prune(model, spec)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from secateur.pruner.plan import PruningPlan, make_plan
from secateur.pruner.spec import PruneSpec
from secateur.pruner.surgery import apply_plan
from secateur.pruner.tracing import analyze


@dataclass(frozen=True)
class PruningResult:
    """A pruned model and the plan that made it.

    Attributes:
        model: the new, physically smaller ``keras.Model``.
        plan: the :class:`PruningPlan` (``plan.to_dict()`` is JSON-safe).
    """

    model: Any
    plan: PruningPlan


def prune(model: Any, spec: PruneSpec | None = None) -> PruningResult:
    """Plan and apply channel pruning in one call.

    Args:
        model: a functional or Sequential ``keras.Model``; left unchanged.
        spec: what to prune; ``PruneSpec()`` defaults when omitted.

    Returns:
        The pruned model and its plan.

    Raises:
        UnsupportedModelError: the model cannot be traced (e.g. subclassed).
        InvalidSpecError: the spec names layers the model lacks.
    """
    spec = spec or PruneSpec()
    graph = analyze(model)
    plan = make_plan(model, spec, graph=graph)
    pruned = apply_plan(model, plan, reload_weights=spec.reload_weights, graph=graph)
    return PruningResult(pruned, plan)
