"""keras.ops nodes, grouped Conv and GroupNormalization: traced, pruned, exact on dead channels."""

from __future__ import annotations

import json
from collections.abc import Callable

import keras
import numpy as np
import pytest

from secateur.pruner import PruneSpec, analyze, apply_plan, make_plan
from secateur.pruner.plan import PruningPlan

from .conftest import assert_same_outputs, kill_pruned_channels, randomize

L = keras.layers
ops = keras.ops


def _wrap(shape, body: Callable, name: str = "m"):
    inp = keras.Input(shape)
    x = body(inp)
    x = L.Flatten()(x) if len(x.shape) > 2 else x
    return keras.Model(inp, L.Dense(3, name="head")(x), name=name)


def conv_bn(filters, name, kernel=1, **kwargs):
    def f(x):
        x = L.Conv2D(filters, kernel, padding="same", name=name, **kwargs)(x)
        return L.BatchNormalization(name=name + "_bn")(x)

    return f


def _csp(x):
    """conv(2c) -> split in halves -> one half through convs -> concat -> conv."""
    x = ops.silu(conv_bn(16, "stem")(x))
    a, b = ops.split(x, 2, axis=-1)
    b = ops.relu(conv_bn(8, "inner", 3)(b))
    return L.Conv2D(6, 1, name="fuse")(ops.concatenate([a, b], axis=-1))


def _split_uneven(x):
    a, b, c = ops.split(conv_bn(12, "p")(x), [3, 8], axis=-1)
    return L.Conv2D(4, 1)(ops.concatenate([c, L.Conv2D(5, 1, name="mid")(a), b], axis=-1))


def _split_other_axis(x):
    top, bottom = ops.split(conv_bn(8, "p")(x), 2, axis=1)
    return L.Conv2D(4, 1)(ops.concatenate([bottom, top], axis=1))


def _se(x):
    """Squeeze (mean keepdims) -> reduce -> expand -> sigmoid -> excite (x * s)."""
    x = ops.silu(conv_bn(16, "conv", 3)(x))
    s = ops.mean(x, axis=(1, 2), keepdims=True)
    s = L.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = ops.sigmoid(L.Conv2D(16, 1, name="se_expand")(s))
    return L.Conv2D(6, 1, name="project")(x * s)


def _se_dense(x):
    """Squeeze without keepdims through Dense, expand_dims back, hard_sigmoid gate."""
    x = ops.relu(conv_bn(12, "conv", 3)(x))
    s = ops.mean(x, axis=[1, 2])
    s = L.Dense(12, name="se_fc")(L.Dense(4, activation="relu", name="se_red")(s))
    s = ops.expand_dims(ops.expand_dims(ops.hard_sigmoid(s), 1), 1)
    return L.Conv2D(5, 1, name="project")(ops.multiply(x, s))


def _reductions(x):
    x = ops.relu(conv_bn(10, "p")(x))
    total = ops.sum(x, axis=(1, 2)) / 36.0
    peak = ops.squeeze(ops.max(x, axis=(1, 2), keepdims=True), axis=(1, 2))
    return L.Dense(4)(total + peak)


def _slices(x):
    x = conv_bn(8, "p")(x)
    x = x[:, 1:, :-1, :]
    return L.Conv2D(4, 1)(ops.relu(x))


def _channel_slice(x):
    x = conv_bn(10, "p")(x)
    return L.Conv2D(4, 1)(ops.relu(x[..., 2:7]))


def _pad_resize(x):
    """Dead channels output sigmoid(0) = 0.5 through every op: folded into 'c'."""
    x = ops.sigmoid(conv_bn(8, "p")(x))
    x = ops.pad(x, [[0, 0], [1, 1], [2, 0], [0, 0]], mode="reflect")
    x = ops.image.resize(x, (5, 5))
    x = ops.average_pool(ops.max_pool(x, 2, 1, "same"), 3, 1, "same")
    return L.Conv2D(4, 3, name="c")(x)


def _zero_pad(x):
    """A zero border makes a 0.5 constant non-uniform: kept live, never dropped."""
    x = ops.sigmoid(conv_bn(8, "p")(x))
    return L.Conv2D(4, 3, name="c")(ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]))


def _unary(x):
    x = conv_bn(12, "p")(x)
    # f(0) != 0 for sigmoid, exp, hard_sigmoid, cos: dead channels output a
    # constant that bias compensation must fold into the next conv.
    y = ops.sigmoid(x) + ops.exp(-ops.square(x)) + ops.hard_sigmoid(x) + ops.cos(x)
    y = y + ops.gelu(x) + ops.tanh(ops.abs(x)) - ops.sqrt(ops.abs(x) + 1.0)
    y = ops.minimum(ops.maximum(ops.negative(y), -3.0), 6.0)
    return L.Conv2D(4, 1, name="c")(ops.cast(y, "float32"))


def _concat_op(x):
    a = conv_bn(6, "pa")(x)
    b = conv_bn(4, "pb")(x)
    c = L.BatchNormalization(name="cat_bn")(ops.concatenate([a, b, a], axis=-1))
    return L.Conv2D(4, 1)(c)


def _grouped(x):
    x = ops.relu(conv_bn(16, "p", 3)(x))
    x = ops.relu(conv_bn(8, "grouped", 3, groups=4)(x))
    return L.Conv2D(4, 1, name="c")(x)


def _group_norm(x):
    x = L.Conv2D(12, 3, padding="same", name="p")(x)
    x = ops.relu(L.GroupNormalization(groups=3, name="gn")(x))
    return L.Conv2D(4, 1, name="c")(x)


def _qkv(x):
    """A Dense(3d) split into q, k, v: each part pruned on its own, q and k coupled."""
    q, k, v = ops.split(L.Dense(12, name="qkv")(x), 3, axis=-1)
    return L.Dense(4, name="out")(ops.relu(q * k) + v)


def _concat_plus_conv(x):
    """concat(a, b) + c: c's filters are cut at the concat boundary, not frozen."""
    cat = ops.concatenate([conv_bn(4, "pa")(x), conv_bn(6, "pb")(x)], axis=-1)
    return L.Conv2D(4, 1)(ops.relu(cat + conv_bn(10, "pc")(x)))


def _group_norm_sigmoid(x):
    """sigmoid after GroupNormalization: a removed dead group outputs 0.5, folded."""
    x = L.GroupNormalization(groups=4, name="gn")(L.Conv2D(8, 3, name="p")(x))
    return L.Conv2D(4, 1, name="c")(ops.sigmoid(x))


def _reshape_transpose(x):
    """(B, H, W, C) -> (B, H*W, C) -> (B, W*H, C) and back: channels keep their index."""
    x = ops.relu(conv_bn(8, "p")(x))
    t = ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (-1, 36, 8))
    return L.Conv2D(4, 1, name="c")(ops.reshape(ops.sigmoid(t), (-1, 6, 6, 8)))


def _grouped_sigmoid(x):
    """sigmoid after a grouped conv without BatchNorm: a dead group outputs 0.5, folded."""
    x = L.Conv2D(9, 3, groups=3, name="grouped")(L.Conv2D(6, 1, name="p")(x))
    return L.Conv2D(4, 1, name="c")(ops.sigmoid(x))


CASES: dict[str, tuple[tuple[int, ...], Callable]] = {
    "grouped_conv_sigmoid": ((6, 6, 3), _grouped_sigmoid),
    "reshape_transpose": ((6, 6, 3), _reshape_transpose),
    "group_norm_sigmoid": ((6, 6, 3), _group_norm_sigmoid),
    "dense_qkv_split": ((5, 6), _qkv),
    "concat_plus_conv": ((6, 6, 3), _concat_plus_conv),
    "csp_split_concat": ((6, 6, 3), _csp),
    "split_uneven_sections": ((6, 6, 3), _split_uneven),
    "split_other_axis": ((6, 6, 3), _split_other_axis),
    "se_mean_keepdims": ((6, 6, 3), _se),
    "se_dense_expand_dims": ((6, 6, 3), _se_dense),
    "sum_max_squeeze": ((6, 6, 3), _reductions),
    "getitem_other_axes": ((6, 6, 3), _slices),
    "getitem_channel_slice": ((6, 6, 3), _channel_slice),
    "pad_resize_pool": ((6, 6, 3), _pad_resize),
    "unary_ops": ((6, 6, 3), _unary),
    "concatenate_op": ((6, 6, 3), _concat_op),
    "grouped_conv": ((6, 6, 3), _grouped),
    "group_normalization": ((6, 6, 3), _group_norm),
}


def _pruned_exactly(model, spec: PruneSpec, shape) -> PruningPlan:
    plan = make_plan(model, spec)
    assert plan.removed_channels > 0, plan.unsupported_layers
    assert plan.unsupported_layers == []
    kill_pruned_channels(model, plan)
    pruned = apply_plan(model, plan)
    assert pruned.count_params() == plan.params_after < model.count_params()
    x = np.random.default_rng(0).normal(size=(3, *shape)).astype("float32")
    assert_same_outputs(model, pruned, x)
    return plan


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_deadChannels_prunedExactly(case: str) -> None:
    shape, body = CASES[case]
    model = randomize(_wrap(shape, body, name=case))
    _pruned_exactly(model, PruneSpec(ratio=0.5, criterion="random", seed=1), shape)


def _frozen_origins(plan: PruningPlan) -> set[str]:
    return {o for g in plan.groups if g.frozen for o in g.origins}


def test_cspBlock_halvesPrunedIndependently_notFrozen() -> None:
    model = randomize(_wrap((6, 6, 3), _csp))
    plan = _pruned_exactly(model, PruneSpec(ratio=0.5, criterion="random", seed=3), (6, 6, 3))
    by_origin = {o: g for g in plan.groups for o in g.origins}
    halves = [by_origin["stem[0:8]"], by_origin["stem[8:16]"]]
    assert all(not g.frozen and g.pruned for g in halves)
    assert not by_origin["inner"].frozen


def test_concatAddedToOneConv_cutsItsFilters() -> None:
    model = randomize(_wrap((6, 6, 3), _concat_plus_conv))
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="random", seed=1))
    keys = {tuple(sorted(g.origins)) for g in plan.groups if not g.frozen}
    assert {("pa", "pc[0:4]"), ("pb", "pc[4:10]")} <= keys


def test_seBlock_expandedWidthPrunable() -> None:
    model = randomize(_wrap((6, 6, 3), _se))
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="random", seed=1))
    conv = next(g for g in plan.groups if "conv" in g.origins)
    assert not conv.frozen and conv.pruned
    assert "se_expand" in conv.origins  # the gate shares the channels it scales


def test_groupedConv_prunesWholeGroups() -> None:
    model = randomize(_wrap((6, 6, 3), _grouped))
    plan = _pruned_exactly(model, PruneSpec(ratio=0.5, criterion="random", seed=1), (6, 6, 3))
    (grp,) = [g for g in plan.groups if any(o.startswith("grouped") for o in g.origins)]
    assert grp.size_before == 4 and not grp.frozen and grp.pruned
    assert grp.unit == 2
    assert PruningPlan.from_dict(json.loads(plan.to_json())).groups[grp.id].unit == 2
    graph = analyze(model)
    # A unit is a whole group: 4 input channels of 'p' and 2 outputs of 'grouped'.
    assert [g.unit for g in graph.groups() if g.key == tuple(sorted(grp.origins))] == [2]
    pruned = apply_plan(model, plan)
    layer = pruned.get_layer("grouped")
    assert layer.groups == grp.size_after
    assert layer.filters == 2 * grp.size_after
    assert pruned.get_layer("p").filters == 4 * grp.size_after


def test_groupNormalization_prunesWholeGroups() -> None:
    model = randomize(_wrap((6, 6, 3), _group_norm))
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="random", seed=1))
    (grp,) = [g for g in plan.groups if any(o.startswith("p") for o in g.origins)]
    assert grp.size_before == 3 and grp.pruned
    pruned = apply_plan(model, plan)
    assert pruned.get_layer("gn").groups == grp.size_after
    assert pruned.get_layer("p").filters == 4 * grp.size_after


def test_minChannels_countsChannelsOfWholeGroups() -> None:
    model = randomize(_wrap((6, 6, 3), _grouped))
    plan = make_plan(model, PruneSpec(ratio=0.9, criterion="random", seed=1, min_channels=6))
    (grp,) = [g for g in plan.groups if any(o.startswith("grouped") for o in g.origins)]
    assert grp.size_after == 3  # 3 groups of 2 output channels >= 6 channels


def test_planJsonRoundTrip_appliesTheSame() -> None:
    shape = (6, 6, 3)
    model = randomize(_wrap(shape, _csp))
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="random", seed=2))
    again = PruningPlan.from_dict(json.loads(plan.to_json()))
    kill_pruned_channels(model, plan)
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")
    assert_same_outputs(apply_plan(model, plan), apply_plan(model, again), x)


def test_zeroPad_nonZeroConstantsKeptLive() -> None:
    """sigmoid of a dead channel is 0.5; a zero border breaks it, so no bias can take it in."""
    model = randomize(_wrap((6, 6, 3), _zero_pad))
    spec = PruneSpec(ratio=0.5, criterion="random", seed=1)
    first = make_plan(model, spec)
    kill_pruned_channels(model, first)
    plan = make_plan(model, spec)
    dead = next(set(range(g.size_before)) - set(g.kept) for g in first.groups if "p" in g.origins)
    grp = next(g for g in plan.groups if "p" in g.origins)
    assert dead and dead <= set(grp.kept)
    assert any("kept as live" in n for n in grp.notes), grp.notes


def _mean_channels(x):
    return L.Dense(4)(ops.mean(conv_bn(8, "p")(x), axis=-1))


def _index_channel(x):
    return L.Conv2D(4, 1)(conv_bn(8, "p")(x)[..., 3:4] * conv_bn(8, "q")(x))


def _pad_channels(x):
    return L.Conv2D(4, 1)(ops.pad(conv_bn(8, "p")(x), [[0, 0], [0, 0], [0, 0], [1, 1]]))


def _strided_channels(x):
    return L.Conv2D(4, 1)(conv_bn(8, "p")(x)[..., ::2])


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (_mean_channels, "reduces the channel axis"),
        (_pad_channels, "pads the channel axis"),
        (_strided_channels, "not a static range"),
        (lambda x: conv_bn(8, "p")(x)[..., 2:2], "not a static range"),
        (lambda x: ops.reshape(conv_bn(8, "p")(x), (-1, 6, 12, 4)), "does not keep the channel"),
        (lambda x: ops.transpose(conv_bn(8, "p")(x), (0, 3, 1, 2)), "moves the channel axis"),
    ],
)
def test_channelMixingOps_freezeWithReason(body, why: str) -> None:
    model = _wrap((6, 6, 3), body)
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="random", seed=1))
    assert any(why in r["reason"] for r in plan.unsupported_layers), plan.unsupported_layers
    assert "p" in _frozen_origins(plan)
