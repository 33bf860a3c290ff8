"""Secateur's pruning library: trace, score, plan and rebuild Keras models.

Typical use::

    from secateur.pruner import PruneSpec, prune, make_plan, apply_plan
    result = prune(model, PruneSpec(ratio=0.3, criterion="bn_scale"))
    result.model  # physically smaller keras.Model
    result.plan   # PruningPlan, JSON-serialisable via plan.to_dict()

Names are imported on first use (PEP 562), so light modules such as
``secateur.pruner.spec`` or ``secateur.pruner.config`` can be used (by the
service, to validate requests) without loading TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PruningResult": "api",
    "prune": "api",
    "EmptyGroupError": "errors",
    "InvalidSpecError": "errors",
    "PlanError": "errors",
    "PlanMismatchError": "errors",
    "SecateurError": "errors",
    "UnsupportedModelError": "errors",
    "ChannelGraph": "graph",
    "analyze": "tracing",
    "register_handler": "handlers",
    "supported_layers": "handlers",
    "GroupPlan": "plan",
    "Member": "plan",
    "PruningPlan": "plan",
    "make_plan": "api",
    "Targets": "targets",
    "TargetUnreachableError": "errors",
    "CRITERIA": "spec",
    "SCOPES": "spec",
    "PruneSpec": "spec",
    "apply_plan": "surgery",
}

__all__ = [
    "CRITERIA",
    "ChannelGraph",
    "EmptyGroupError",
    "GroupPlan",
    "InvalidSpecError",
    "Member",
    "PlanError",
    "PlanMismatchError",
    "PruneSpec",
    "PruningPlan",
    "PruningResult",
    "SCOPES",
    "SecateurError",
    "TargetUnreachableError",
    "Targets",
    "UnsupportedModelError",
    "analyze",
    "apply_plan",
    "make_plan",
    "prune",
    "register_handler",
    "supported_layers",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'secateur.pruner' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"secateur.pruner.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from secateur.pruner.api import PruningResult, make_plan, prune
    from secateur.pruner.errors import (
        EmptyGroupError,
        InvalidSpecError,
        PlanError,
        PlanMismatchError,
        SecateurError,
        TargetUnreachableError,
        UnsupportedModelError,
    )
    from secateur.pruner.graph import ChannelGraph
    from secateur.pruner.handlers import register_handler, supported_layers
    from secateur.pruner.plan import GroupPlan, Member, PruningPlan
    from secateur.pruner.spec import CRITERIA, SCOPES, PruneSpec
    from secateur.pruner.surgery import apply_plan
    from secateur.pruner.targets import Targets
    from secateur.pruner.tracing import analyze
