"""Random valid keep-sets, and the exactness check every test model must pass with them.

A plan that ``PruningPlan.validate()`` accepts must apply; with the
producers of every removed channel zeroed (``kill_pruned_channels``) the
pruned model must reproduce the original's outputs, unless a pruned group
carries a note that says it cannot (a normalisation over the channels).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np

from secateur.pruner import apply_plan
from secateur.pruner.plan import PruningPlan

from .conftest import assert_same_outputs, kill_pruned_channels

# Notes that announce an inexact removal: the check skips the comparison.
INEXACT_NOTES = ("normalises over channels",)


def random_keep_set(plan: PruningPlan, rng: np.random.Generator) -> PruningPlan:
    """A copy of ``plan`` keeping a random non-empty subset of every prunable group."""
    out = copy.deepcopy(plan)
    for g in out.groups:
        if g.frozen or g.size_before < 2:
            continue
        n = int(rng.integers(1, g.size_before + 1))
        g.kept = sorted(int(i) for i in rng.choice(g.size_before, n, replace=False))
        g.size_after = n
    out.validate()
    return out


def announced_inexact(plan: PruningPlan) -> bool:
    return any(
        any(word in n for word in INEXACT_NOTES) for g in plan.groups if g.pruned for n in g.notes
    )


def assert_applies_exactly(model: Any, plan: PruningPlan, x: Any) -> Any:
    """Zero what ``plan`` removes in ``model`` (in place), apply it, compare outputs.

    Returns:
        The pruned model.
    """
    kill_pruned_channels(model, plan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = apply_plan(model, plan)
    # Zeroing producers after planning can turn a removed channel into a
    # non-zero constant (sigmoid(0), x + 1) that compensation can fold only
    # approximately (zero padding); apply_plan then says so.
    warned = any("cannot keep outputs exact" in str(w.message) for w in caught)
    if not announced_inexact(plan) and not warned:
        assert_same_outputs(model, pruned, x)
    return pruned
