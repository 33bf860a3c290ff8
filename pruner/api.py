"""The one-call entry point: ``prune(model, spec)``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secateur.pruner import plan as plan_module
from secateur.pruner.budget import plan_to_targets
from secateur.pruner.costmodel import Meter
from secateur.pruner.graph import ChannelGraph
from secateur.pruner.plan import PruningPlan
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


def make_plan(
    model: Any,
    spec: PruneSpec,
    graph: ChannelGraph | None = None,
    device_kind: str | None = None,
    data: Iterable[Any] | None = None,
    meter: Meter | None = None,
    state_dir: str | Path | None = None,
) -> PruningPlan:
    """Plan by ratio (:func:`secateur.pruner.plan.make_plan`) or to ``spec.targets``.

    Args:
        model, spec, graph, device_kind, data: as for the ratio planner.
        meter: measures step time, latency and peak memory for measured
            targets (default: a DeviceMeter on what is attached).
        state_dir: where measured cost profiles are cached.

    Raises:
        TargetUnreachableError: a target cannot be met (best reached attached).
    """
    if spec.targets is not None:
        return plan_to_targets(model, spec, graph, device_kind, data, meter, state_dir)
    return plan_module.make_plan(model, spec, graph, device_kind, data)


def prune(
    model: Any,
    spec: PruneSpec | None = None,
    meter: Meter | None = None,
    state_dir: str | Path | None = None,
) -> PruningResult:
    """Plan and apply channel pruning in one call.

    Args:
        model: a functional or Sequential ``keras.Model``; left unchanged.
        spec: what to prune; ``PruneSpec()`` defaults when omitted.
        meter: for measured targets (see :func:`make_plan`).
        state_dir: where measured cost profiles are cached.

    Returns:
        The pruned model and its plan (``plan.targets`` reports each target).

    Raises:
        UnsupportedModelError: the model cannot be traced (e.g. subclassed).
        InvalidSpecError: the spec names layers the model lacks.
        TargetUnreachableError: a target cannot be met.
    """
    spec = spec or PruneSpec()
    graph = analyze(model)
    plan = make_plan(model, spec, graph=graph, meter=meter, state_dir=state_dir)
    pruned = apply_plan(model, plan, reload_weights=spec.reload_weights, graph=graph)
    return PruningResult(pruned, plan)
