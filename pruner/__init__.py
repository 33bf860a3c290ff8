"""Secateur's pruning library: trace, score, plan and rebuild Keras models.

Typical use::

    from secateur.pruner import PruneSpec, prune, make_plan, apply_plan
    result = prune(model, PruneSpec(ratio=0.3, criterion="bn_scale"))
    result.model  # physically smaller keras.Model
    result.plan   # PruningPlan, JSON-serialisable via plan.to_dict()
"""

from secateur.pruner.api import PruningResult, prune
from secateur.pruner.errors import (
    EmptyGroupError,
    InvalidSpecError,
    PlanError,
    PlanMismatchError,
    SecateurError,
    UnsupportedModelError,
)
from secateur.pruner.graph import ChannelGraph, analyze
from secateur.pruner.handlers import register_handler, supported_layers
from secateur.pruner.plan import GroupPlan, Member, PruningPlan, make_plan
from secateur.pruner.spec import CRITERIA, SCOPES, PruneSpec
from secateur.pruner.surgery import apply_plan

__all__ = [
    "CRITERIA",
    "SCOPES",
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
    "SecateurError",
    "UnsupportedModelError",
    "analyze",
    "apply_plan",
    "make_plan",
    "prune",
    "register_handler",
    "supported_layers",
]
