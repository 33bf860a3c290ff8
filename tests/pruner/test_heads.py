"""MultiHeadAttention: whole heads pruned by PruneSpec.head_ratio, channels through it.

A head whose value projection (kernel and bias slice) is zero outputs zero
for every query (softmax weights sum to one over values that are all zero),
so its rows of the output projection add nothing: removing it is exact.
Zeroing its query and key slices too (and its output rows) makes every
magnitude criterion rank it last.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from secateur.pruner import PruneSpec, analyze, apply_plan, make_plan
from secateur.pruner.errors import InvalidSpecError
from secateur.pruner.plan import PruningPlan

from .conftest import assert_same_outputs, kill_pruned_channels

L = keras.layers


def vit(blocks: int = 2, d: int = 16, heads: int = 4, key_dim: int = 4, **mha) -> keras.Model:
    """Tokens -> Dense embed -> [LN -> MHA(self) -> Add -> LN -> MLP -> Add] x blocks -> head."""
    inp = keras.Input((6, 5))
    x = L.Dense(d, name="embed")(inp)
    for b in range(blocks):
        y = L.LayerNormalization(name=f"b{b}_ln1")(x)
        y = L.MultiHeadAttention(heads, key_dim, name=f"b{b}_mha", **mha)(y, y)
        x = L.Add(name=f"b{b}_add1")([x, y])
        y = L.LayerNormalization(name=f"b{b}_ln2")(x)
        y = L.Dense(2 * d, activation="gelu", name=f"b{b}_fc1")(y)
        y = L.Dense(d, name=f"b{b}_fc2")(y)
        x = L.Add(name=f"b{b}_add2")([x, y])
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inp, L.Dense(3, name="head")(x), name="vit")


def randomize_all(model: keras.Model, seed: int = 0) -> None:
    """Every weight random (biases, LayerNorm gamma/beta too) so a wrong slice shows."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = [rng.normal(0, 0.4, w.shape).astype("float32") for w in layer.weights]
        if values:
            layer.set_weights(values)


def kill_heads(layer: L.MultiHeadAttention, heads: list[int]) -> None:
    """Zero the query/key/value slices and output rows of ``heads``."""
    for dense in (layer._query_dense, layer._key_dense, layer._value_dense):
        kernel, *bias = [w.numpy() for w in dense.weights]
        kernel[:, heads] = 0.0
        for b in bias:
            b[heads] = 0.0
        dense.set_weights([kernel, *bias])
    kernel, *bias = [w.numpy() for w in layer._output_dense.weights]
    kernel[heads] = 0.0
    layer._output_dense.set_weights([kernel, *bias])


def tokens(n: int = 4, shape: tuple[int, ...] = (6, 5)) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (n, *shape)).astype("float32")


def _heads(plan: PruningPlan) -> dict[str, list[int]]:
    return {g.origins[0]: g.kept for g in plan.groups if g.kind == "heads"}


@pytest.mark.parametrize("criterion", ["l1", "l2", "lamp", "bn_scale"])
def test_vit_deadHeads_areTheOnesRemoved_outputsExact(criterion: str) -> None:
    model = vit()
    randomize_all(model)
    kill_heads(model.get_layer("b0_mha"), [1, 3])
    kill_heads(model.get_layer("b1_mha"), [0, 2])
    plan = make_plan(model, PruneSpec(ratio=0.0, head_ratio=0.5, criterion=criterion))
    assert _heads(plan) == {"b0_mha:heads": [0, 2], "b1_mha:heads": [1, 3]}
    assert (plan.prunable_heads, plan.removed_heads, plan.removed_channels) == (8, 4, 0)
    pruned = apply_plan(model, plan)
    for b in range(2):
        layer = pruned.get_layer(f"b{b}_mha")
        assert layer.num_heads == 2 and layer.key_dim == 4
    assert pruned.count_params() == plan.params_after < plan.params_before
    # Per removed head and layer: q/k/v/output projections at 6 tokens (d=16,
    # key_dim=value_dim=4) plus scores and weighted values over 6x6 pairs.
    per_head = 2 * 6 * (3 * 16 * 4 + 4 * 16) + 2 * 36 * (4 + 4)
    assert plan.flops_before - plan.flops_after == 2 * 2 * per_head
    assert_same_outputs(model, pruned, tokens(), tol=1e-5)


def test_vit_headsOfBnScale_fallBackToL1_sayingWhy() -> None:
    plan = make_plan(vit(), PruneSpec(head_ratio=0.25))
    heads = [g for g in plan.groups if g.kind == "heads"]
    assert len(heads) == 2 and all(g.size_after == 3 for g in heads)
    assert all(g.criterion == "l1" and "no BatchNormalization" in (g.fallback or "") for g in heads)
    assert all(any("value bias" in n and "dropped" in n for n in g.notes) for g in heads)
    assert {m.weight for m in heads[0].members} == {
        "query/kernel", "query/bias", "key/kernel", "key/bias",
        "value/kernel", "value/bias", "attention_output/kernel",
    }  # fmt: skip


def test_headRatioZero_keepsEveryHead_andHeadsNeverCompeteWithChannels() -> None:
    model = vit()
    randomize_all(model)
    # Heads of near-zero weights would win a pooled ranking against every channel.
    for b in range(2):
        kill_heads(model.get_layer(f"b{b}_mha"), [0, 1, 2])
    plan = make_plan(model, PruneSpec(ratio=0.5, head_ratio=0.0, criterion="l1"))
    assert all(g.size_after == g.size_before == 4 for g in plan.groups if g.kind == "heads")
    assert plan.removed_channels == round(0.5 * plan.prunable_channels)
    # At the largest head_ratio every layer still keeps one head.
    plan = make_plan(model, PruneSpec(ratio=0.0, head_ratio=0.99, criterion="l1"))
    assert all(g.size_after == 1 for g in plan.groups if g.kind == "heads")
    assert plan.removed_channels == 0


def test_channelsThroughAttention_deadChannelsAndHeads_exact() -> None:
    """No LayerNorm: the residual stream's channels prune exactly through the MHA."""
    inp = keras.Input((6, 5))
    x = L.Dense(12, name="embed")(inp)
    y = L.MultiHeadAttention(3, 5, value_dim=3, name="mha")(x, x)
    x = L.Add(name="add")([x, y])
    x = L.Dense(10, activation="relu", name="fc")(x)
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling1D()(x)))
    randomize_all(model)
    plan = make_plan(model, PruneSpec(ratio=0.4, head_ratio=0.34, criterion="random"))
    residual = next(g for g in plan.groups if "embed" in g.origins)
    assert residual.kind == "channels" and not residual.frozen and residual.pruned
    assert _heads(plan)["mha:heads"] != [0, 1, 2]
    kill_pruned_channels(model, plan)
    pruned = apply_plan(model, plan)
    assert pruned.get_layer("mha").num_heads == 2
    assert pruned.get_layer("embed").units == residual.size_after
    assert pruned.count_params() == plan.params_after
    assert_same_outputs(model, pruned, tokens(), tol=1e-5)


def test_crossAttention_ownKeyNoBiasOutputShape_exact() -> None:
    """Query, key and value from different producers; use_bias=False; output_shape=(7,)."""
    q_in, kv_in = keras.Input((4, 3)), keras.Input((6, 5))
    q = L.Dense(8, name="q_proj")(q_in)
    k = L.Dense(9, name="k_proj")(kv_in)
    v = L.Dense(10, name="v_proj")(kv_in)
    mha = L.MultiHeadAttention(4, 3, value_dim=2, use_bias=False, output_shape=7, name="mha")
    y = mha(q, v, key=k)
    y = L.Dense(6, activation="relu", name="fc")(y)
    out = L.Dense(2, name="head")(L.GlobalAveragePooling1D()(y))
    model = keras.Model([q_in, kv_in], out)
    randomize_all(model)
    plan = make_plan(model, PruneSpec(ratio=0.3, head_ratio=0.5, criterion="random", seed=3))
    widths = {g.origins[0]: (g.size_before, g.size_after) for g in plan.groups}
    assert widths["mha:heads"] == (4, 2)
    for name, size in (("q_proj", 8), ("k_proj", 9), ("v_proj", 10), ("mha", 7)):
        assert widths[name][0] == size and widths[name][1] < size, name
    kill_pruned_channels(model, plan)
    pruned = apply_plan(model, plan)
    assert pruned.get_layer("mha").get_config()["output_shape"][-1] == widths["mha"][1]
    assert pruned.count_params() == plan.params_after
    assert_same_outputs(model, pruned, [tokens(shape=(4, 3)), tokens(shape=(6, 5))], tol=1e-5)


def test_unprunableConfigurations_freezeWithTheReason() -> None:
    x = keras.Input((6, 8))
    h = L.Dense(8, name="d")(x)
    y, scores = L.MultiHeadAttention(2, 4, name="scores")(h, h, return_attention_scores=True)
    z = L.MultiHeadAttention(2, 4, output_shape=(2, 4), name="shaped")(y, y)
    model = keras.Model(x, [L.Flatten()(z), L.Flatten()(scores)])
    plan = make_plan(model, PruneSpec(head_ratio=0.5))
    by_origin = {o: g for g in plan.groups for o in g.origins}
    assert any("attention scores" in r for r in by_origin["scores:heads"].frozen)
    assert {"layer": "shaped", "class": "MultiHeadAttention"}.items() <= (
        plan.unsupported_layers[0].items()
    )
    assert "output_shape=(2, 4)" in plan.unsupported_layers[0]["reason"]
    assert apply_plan(model, plan).count_params() == model.count_params()


def test_gatedAttention_deadHeadsExact() -> None:
    model = vit(blocks=1, use_gate=True)
    randomize_all(model)
    kill_heads(model.get_layer("b0_mha"), [2])
    plan = make_plan(model, PruneSpec(ratio=0.0, head_ratio=0.25, criterion="l1"))
    assert _heads(plan) == {"b0_mha:heads": [0, 1, 3]}
    assert_same_outputs(model, apply_plan(model, plan), tokens(), tol=1e-5)


@pytest.mark.parametrize("value", [1.0, -0.1, math.nan, math.inf, "0.5", True, None])
def test_headRatio_outOfRange_refusedNamingTheField(value) -> None:
    with pytest.raises(InvalidSpecError) as info:
        PruneSpec(head_ratio=value)
    assert info.value.field == "head_ratio" and "head_ratio" in str(info.value)
    assert "Received:" in str(info.value)


def test_headRatio_specAndPlan_roundTripThroughJson() -> None:
    spec = PruneSpec(ratio=0.2, head_ratio=0.5)
    assert PruneSpec.from_dict(spec.to_dict()) == spec
    assert PruneSpec.from_dict({"ratio": 0.2}).head_ratio == 0.0
    model = vit(blocks=1)
    plan = make_plan(model, spec)
    again = PruningPlan.from_dict(plan.to_dict())
    assert [g.kind for g in again.groups] == [g.kind for g in plan.groups]
    assert again.to_dict() == plan.to_dict()
    # A plan written before group kinds existed loads as channel groups.
    old = plan.to_dict()
    for g in old["groups"]:
        g.pop("kind")
    assert {g.kind for g in PruningPlan.from_dict(old).groups} == {"channels"}


@pytest.mark.parametrize("schedule", ["linear", "geometric"])
def test_iterativeRounds_headRatioFollowsTheScheduleToo(schedule: str) -> None:
    spec = PruneSpec(ratio=0.5, head_ratio=0.75, iterative_steps=3, iterative_schedule=schedule)
    rounds = [spec.round_spec(j) for j in range(3)]
    assert [r.ratio for r in rounds] == list(spec.round_ratios())
    assert math.isclose(np.prod([1 - r.head_ratio for r in rounds]), 0.25)
    assert PruneSpec(head_ratio=0.5).round_spec(0).head_ratio == 0.5


def test_trace_mhaNoLongerFreezesTheResidualStream() -> None:
    graph = analyze(vit())
    residual = next(g for g in graph.groups() if "embed" in g.origins)
    assert residual.prunable and {"b0_fc2", "b1_fc2"} <= set(residual.origins)
    assert sorted(g.kind for g in graph.groups() if g.prunable).count("heads") == 2


@pytest.mark.parametrize("axes,prunable", [((1, 2), True), ((2,), True), ((3,), False)])
def test_attentionAxes_overPositionsOnly_prunesHeads_elseFreezesThem(axes, prunable) -> None:
    """Rank-4 tokens project to (batch, h, w, heads, dim): axis 3 would attend across heads."""
    x = keras.Input((3, 4, 5))
    h = L.Dense(8, name="d")(x)
    y = L.MultiHeadAttention(2, 4, attention_axes=axes, name="mha")(h, h)
    model = keras.Model(x, L.Dense(2, name="head")(L.Flatten()(y)))
    randomize_all(model)
    kill_heads(model.get_layer("mha"), [1])
    plan = make_plan(model, PruneSpec(ratio=0.0, head_ratio=0.5, criterion="l1"))
    [heads] = [g for g in plan.groups if g.kind == "heads"]
    if not prunable:
        assert heads.size_after == 2 and "attention_axes=(3,)" in heads.frozen[0]
        return
    assert heads.kept == [0]
    assert_same_outputs(model, apply_plan(model, plan), tokens(shape=(3, 4, 5)), tol=1e-5)


def test_taylor_channelsByTaylor_headsFallBackToL1_deadHeadsRemoved() -> None:
    model = vit()
    randomize_all(model)
    kill_heads(model.get_layer("b0_mha"), [0, 1])
    kill_heads(model.get_layer("b1_mha"), [3, 2])
    data = [(tokens(8), np.arange(8) % 3)]
    spec = PruneSpec(ratio=0.2, head_ratio=0.5, criterion="taylor", taylor_batches=1)
    plan = make_plan(model, spec, data=data)
    assert _heads(plan) == {"b0_mha:heads": [2, 3], "b1_mha:heads": [0, 1]}
    heads = [g for g in plan.groups if g.kind == "heads"]
    assert all(g.criterion == "l1" and "taylor" in (g.fallback or "") for g in heads)
    assert {g.criterion for g in plan.groups if g.kind == "channels" and g.pruned} == {"taylor"}


@pytest.mark.parametrize("use_gate", [False, True])
def test_groupedQueryAttention_deadKeyValueHead_removedWithItsQueryHeads_exact(use_gate) -> None:
    inp = keras.Input((6, 5))
    x = L.Dense(12, name="embed")(inp)
    gqa = L.GroupQueryAttention(4, 4, 2, use_gate=use_gate, name="gqa")  # head_dim 4
    x = L.Add(name="add")([x, gqa(x, x)])
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling1D()(x)))
    randomize_all(model)
    layer = model.get_layer("gqa")
    # Key/value head 1 serves query heads 2 and 3 (each repeated r = 2 times).
    for dense, dead in (
        (layer._key_dense, 1),
        (layer._value_dense, 1),
        (layer._query_dense, [2, 3]),
    ):
        kernel, bias = [w.numpy() for w in dense.weights]
        kernel[:, dead], bias[dead] = 0.0, 0.0
        dense.set_weights([kernel, bias])
    kernel, bias = [w.numpy() for w in layer._output_dense.weights]
    kernel[[2, 3]] = 0.0
    layer._output_dense.set_weights([kernel, bias])
    plan = make_plan(model, PruneSpec(ratio=0.0, head_ratio=0.5, criterion="l1"))
    assert _heads(plan) == {"gqa:heads": [0]}
    pruned = apply_plan(model, plan)
    new = pruned.get_layer("gqa")
    assert (new.num_query_heads, new.num_key_value_heads, new.head_dim) == (2, 1, 4)
    assert pruned.count_params() == plan.params_after
    assert_same_outputs(model, pruned, tokens(), tol=1e-5)


def test_excludedAttentionLayer_keepsItsHeads_layerwiseScopeCutsEachLayer() -> None:
    spec = PruneSpec(ratio=0.0, head_ratio=0.5, scope="layerwise", exclude=("b0_mha",))
    plan = make_plan(vit(), spec)
    by_origin = {g.origins[0]: g for g in plan.groups if g.kind == "heads"}
    assert by_origin["b0_mha:heads"].size_after == 4
    assert "excluded" in by_origin["b0_mha:heads"].frozen[0]
    assert by_origin["b1_mha:heads"].size_after == 2


def test_headPlan_replaysOnSavedAndReloadedModel(tmp_path) -> None:
    model = vit(blocks=1)
    randomize_all(model)
    plan = make_plan(model, PruneSpec(ratio=0.2, head_ratio=0.5, criterion="l1"))
    path = str(tmp_path / "vit.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    replayed = apply_plan(reloaded, PruningPlan.from_dict(plan.to_dict()))
    assert replayed.get_layer("b0_mha").num_heads == 2
    np.testing.assert_array_equal(
        np.asarray(replayed(tokens())), np.asarray(apply_plan(model, plan)(tokens()))
    )
