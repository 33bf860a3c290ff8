"""Property: every keep-set ``PruningPlan.validate()`` accepts applies, exactly on dead channels.

For each test model (the exactness architectures, the attention models, the
keras.ops blocks) random valid keep-sets are drawn: a random non-empty
subset of every prunable group (channels, blocks or heads), frozen groups
whole. Each must apply, and with the producers of the removed channels
zeroed the pruned model must reproduce the original's outputs. A keep-set
that prunes a frozen group is refused by ``validate()`` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from secateur.pruner import PruneSpec, make_plan
from secateur.pruner.errors import PlanError

from ..attention_models import image_attention_model
from .block_models import randomize_every_weight
from .conftest import ARCHITECTURES
from .keep_sets import assert_applies_exactly, random_keep_set
from .test_attention_ops import ops_attention
from .test_handlers_ops import CASES, _wrap
from .test_heads import vit

MODELS: dict[str, tuple[Callable[[], Any], tuple[int, ...]]] = {
    **{k: v for k, v in ARCHITECTURES.items()},
    "image_attention": (image_attention_model, (32, 32, 3)),
    "vit": (vit, (6, 5)),
    "vit_gqa_free_mha_value_dim": (lambda: vit(value_dim=3), (6, 5)),
    "ops_attention": (ops_attention, (6, 5)),
    "ops_attention_qkv_split": (lambda: ops_attention(qkv_split=True), (6, 5)),
    **{f"ops_{k}": ((lambda s=s, b=b, k=k: _wrap(s, b, name=k)), s) for k, (s, b) in CASES.items()},
}
SLOW = {"vgg16_bn_cifar", "image_attention"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(MODELS)]
)
def test_randomValidKeepSets_applyAndAreExactOnDeadChannels(name: str) -> None:
    build, shape = MODELS[name]
    model = build()
    randomize_every_weight(model)
    original = model.get_weights()
    plan = make_plan(model, PruneSpec(ratio=0.3, head_ratio=0.5, criterion="random", seed=3))
    rng = np.random.default_rng(11)
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")
    for _ in range(2):
        model.set_weights(original)
        assert_applies_exactly(model, random_keep_set(plan, rng), x)


def test_keepSetPruningAFrozenGroup_refusedByValidate() -> None:
    build, _ = MODELS["ops_attention"]
    plan = make_plan(build(), PruneSpec(ratio=0.3, criterion="random"))
    frozen = next(g for g in plan.groups if g.frozen and g.size_before > 1)
    frozen.kept, frozen.size_after = frozen.kept[1:], frozen.size_before - 1
    with pytest.raises(PlanError, match="a frozen group cannot prune"):
        plan.validate()


def test_splitInTwo_partsKeepingTwoAndFive_rebuiltWithIndicesNotSections() -> None:
    # Regression: the new split index [2] equalled the old section count 2,
    # so the op was not re-created and split 7 channels into 2 equal parts.
    build, shape = MODELS["ops_csp_split_concat"]
    model = build()
    plan = make_plan(model, PruneSpec(ratio=0.3, criterion="random", seed=3))
    for g in plan.groups:
        if g.origins in (["stem[0:8]"], ["stem[8:16]"]):
            g.kept = [0, 6] if g.origins == ["stem[0:8]"] else [0, 1, 2, 3, 6]
            g.size_after = len(g.kept)
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")
    assert_applies_exactly(model, plan, x)
