"""Real model code's blocks: each pruned exactly, or frozen with a reason, never inexact.

The blocks (``block_models``) cover normalisation over the channels inside a
block, custom per-channel layers, attention variants and reshapes whose
factorisation depends on the width. For each, the plan either prunes the
block's channels (and, with the removed channels' producers zeroed, the
pruned model reproduces the original's outputs) or freezes them with a
reason naming what stops it; a LayerNormalization says so in a note.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from secateur.pruner import PruneSpec, make_plan
from secateur.pruner.plan import PruningPlan

from .block_models import (
    IMAGE_BLOCKS,
    TOKEN_BLOCKS,
    PlainConv2D,
    WSConv2D,
    block_model,
    randomize_every_weight,
)
from .keep_sets import assert_applies_exactly, random_keep_set

L = keras.layers
SPEC = PruneSpec(ratio=0.4, head_ratio=0.5, criterion="random", seed=1)

# Block -> (the origin of a group inside the block, what the plan does with it:
# "pruned", "noted: <text>" or a piece of the frozen reason).
EXPECTED: dict[str, tuple[str, str]] = {
    "grn_ops": ("pw", "(Mean): reduces the channel axis"),
    "rms_ops": ("pw", "(Mean): reduces the channel axis"),
    "l2_ops": ("pw", "(Sum): reduces the channel axis"),
    "grn_layer": ("pw", "(GRN): layer class is not in the registry, and it does not compute"),
    "rms_layer": ("pw", "(RMSScale): layer class is not in the registry, and it does not"),
    "layer_norm": ("pw", "noted: (LayerNormalization) normalises over channels"),
    "affine": ("pw", "pruned"),
    "bias": ("pw", "pruned"),
    "gain": ("pw", "pruned"),
    "scalar_gain": ("pw", "pruned"),
    "ws_conv": ("ws1:0", "(WSConv2D): layer class is not in the registry (a subclass of Conv2D"),
    "plain_conv_subclass": ("sub", "pruned"),
    "grouped_per_output": ("grouped", "pruned"),
    "heads_reshape": ("pw", "(6, 6, 32) -> (6, 6, 4, 8) does not keep the channel axis"),
    "flat_reshape": ("pw", "(6, 6, 16) -> (6, 96) does not keep the channel axis"),
    "kv_strided": ("q/4", "pruned"),
    "kv_pooled": ("q/4", "pruned"),
    "kv_stacked": ("q/4", "heads reshaped out of channels"),
    "channel_attention": ("q/4", "heads reshaped out of channels"),
    "permute_heads": ("q", "(16, 16) -> (16, 4, 4) does not keep the channel axis"),
    "token_mixing": ("embed", "(Permute): permutation (2, 1) moves the channel axis"),
    "token_mixing_ops": ("embed", "(Transpose): permutation (0, 2, 1) moves the channel axis"),
    "mha_kv_pooled": ("mha:heads", "pruned"),
    "mha_separate_key": ("mha:heads", "pruned"),
    "gqa": ("gqa:heads", "pruned"),
}
BLOCKS = sorted({**IMAGE_BLOCKS, **TOKEN_BLOCKS})


def test_everyBlock_hasAnExpectation() -> None:
    assert sorted(EXPECTED) == BLOCKS


def _group(plan: PruningPlan, origin: str):
    return next(g for g in plan.groups if origin in g.origins)


def _inputs(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")


@pytest.mark.parametrize("name", BLOCKS)
def test_block_prunedExactly_orFrozenWithTheReason(name: str) -> None:
    model, shape = block_model(name)
    randomize_every_weight(model)
    plan = make_plan(model, SPEC)
    origin, expected = EXPECTED[name]
    group = _group(plan, origin)
    if expected == "pruned":
        assert not group.frozen and group.pruned, group.frozen
    elif expected.startswith("noted: "):
        assert group.pruned and any(expected[7:] in n for n in group.notes), group.notes
    else:
        assert group.frozen and not group.pruned
        assert any(expected in r for r in group.frozen), group.frozen
    assert plan.removed_channels + plan.removed_heads > 0
    assert_applies_exactly(model, plan, _inputs(shape))


@pytest.mark.parametrize("name", BLOCKS)
def test_block_randomValidKeepSets_applyExactly(name: str) -> None:
    model, shape = block_model(name)
    randomize_every_weight(model)
    original = model.get_weights()
    plan = make_plan(model, SPEC)
    rng = np.random.default_rng(7)
    for _ in range(2):
        model.set_weights(original)
        assert_applies_exactly(model, random_keep_set(plan, rng), _inputs(shape))


def test_customPerChannelLayers_recognisedByWhatTheyCompute_noUnsupportedLayer() -> None:
    for name, layer in (("affine", "affine"), ("bias", "bias"), ("gain", "gain")):
        model, _ = block_model(name)
        plan = make_plan(model, SPEC)
        assert plan.unsupported_layers == [], name
        roles = {m.role for m in _group(plan, "pw").members if m.layer == layer}
        assert roles and roles <= {"scale", "shift"}, (name, roles)
    # One gain for every channel follows no channel and freezes nothing.
    plan = make_plan(block_model("scalar_gain")[0], SPEC)
    assert plan.unsupported_layers == [] and _group(plan, "pw").pruned


def test_affineLayer_weightRoles_scaleAndShift() -> None:
    model, _ = block_model("affine")
    members = _group(make_plan(model, SPEC), "pw").members
    assert {(m.weight, m.role) for m in members if m.layer == "affine"} == {
        ("alpha", "scale"),
        ("beta", "shift"),
    }


def _ws_only(cls: type) -> keras.Model:
    inp = keras.Input((8, 8, 3))
    x = cls(8, 3, padding="same", name="c1")(inp)
    x = cls(8, 3, padding="same", name="c2")(L.ReLU()(x))
    x = cls(4, 3, padding="same", name="c3")(L.ReLU()(x))
    return keras.Model(inp, L.GlobalAveragePooling2D()(x))


def test_modelFrozenByOneUnknownConvClass_saysSoInOneSummaryLine() -> None:
    plan = make_plan(_ws_only(WSConv2D), SPEC)
    summary = plan.summary()
    assert "\n" not in summary
    assert (
        "0% of channels prunable: every channel group is frozen by layer class WSConv2D "
        "(layer class is not in the registry (a subclass of Conv2D that does not compute what "
        "Conv2D computes))"
    ) in summary


def test_convSubclassComputingWhatConv2DDoes_prunedLikeConv2D() -> None:
    plan = make_plan(_ws_only(PlainConv2D), SPEC)
    assert plan.unsupported_layers == []
    assert "every channel group" not in plan.summary()
    assert plan.removed_channels > 0


def test_groupedConvOneFilterPerGroup_planned_noReshapeError() -> None:
    # Regression: groups == filters with two inputs per group was taken for a
    # depthwise conv by the constant trace, whose reshape then raised.
    model, shape = block_model("grouped_per_output")
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="bn_scale"))
    assert _group(plan, "grouped").unit == 1
    assert_applies_exactly(model, plan, _inputs(shape))
