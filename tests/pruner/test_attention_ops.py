"""Attention written with keras.ops: whole heads pruned through reshape/transpose/matmul/softmax.

A head whose query, key and value slices (kernel columns and bias) are zero
gives zero values for every query (softmax weights sum to one), so the
projection's rows of that head add nothing: removing the head is exact.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from secateur.pruner import PruneSpec, analyze, apply_plan, make_plan
from secateur.pruner.plan import PruningPlan

from .conftest import assert_same_outputs
from .test_heads import randomize_all

L = keras.layers
ops = keras.ops
N, C, H = 6, 16, 4
D = C // H


def _heads(t, h: int = H):  # (B, N, C) -> (B, h, N, d)
    return ops.transpose(ops.reshape(t, (-1, N, h, C // h)), (0, 2, 1, 3))


def _attend(q, k, v, h: int = H, scale: float = D**-0.5):
    a = ops.softmax(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * scale, axis=-1)
    a = L.Dropout(0.1)(a)
    return ops.reshape(ops.transpose(ops.matmul(a, v), (0, 2, 1, 3)), (-1, N, C))


def ops_attention(qkv_split: bool = False, blocks: int = 2) -> keras.Model:
    """Tokens -> Dense -> [LN -> q/k/v (or qkv + split) -> heads -> proj -> Add] x blocks."""
    inp = keras.Input((N, 5))
    x = L.Dense(C, name="embed")(inp)
    for b in range(blocks):
        y = L.LayerNormalization(name=f"b{b}_ln")(x)
        if qkv_split:
            q, k, v = ops.split(L.Dense(3 * C, name=f"b{b}_qkv")(y), 3, axis=-1)
        else:
            q, k, v = (L.Dense(C, name=f"b{b}_{n}")(y) for n in "qkv")
        y = _attend(_heads(q), _heads(k), _heads(v))
        x = L.Add(name=f"b{b}_add")([x, L.Dense(C, name=f"b{b}_proj")(y)])
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inp, L.Dense(3, name="head")(x))


def kill(model: keras.Model, b: int, heads: list[int], qkv_split: bool) -> None:
    """Zero the q/k/v columns (kernel and bias) of ``heads`` in block ``b``."""
    cols = np.concatenate([np.arange(h * D, (h + 1) * D) for h in heads])
    names = [(f"b{b}_qkv", cols + part * C) for part in range(3)] if qkv_split else []
    names = names or [(f"b{b}_{n}", cols) for n in "qkv"]
    for name, where in names:
        kernel, bias = model.get_layer(name).get_weights()
        kernel[:, where], bias[where] = 0.0, 0.0
        model.get_layer(name).set_weights([kernel, bias])


def head_groups(plan: PruningPlan) -> list[tuple[int, list[int]]]:
    return sorted((g.size_before, g.kept) for g in plan.groups if g.kind == "heads")


def tokens(n: int = 3) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (n, N, 5)).astype("float32")


@pytest.mark.parametrize("qkv_split", [False, True])
def test_opsAttention_deadHeads_removedWholeAndExact(qkv_split: bool) -> None:
    model = ops_attention(qkv_split)
    randomize_all(model)
    kill(model, 0, [1, 3], qkv_split)
    kill(model, 1, [2], qkv_split)
    plan = make_plan(model, PruneSpec(ratio=0.0, head_ratio=0.375, criterion="l1"))
    # One head group per block: q, k and v (and the projection's rows) coupled.
    assert head_groups(plan) == [(4, [0, 1, 3]), (4, [0, 2])]
    pruned = apply_plan(model, plan)
    proj = {b: pruned.get_layer(f"b{b}_proj").kernel.shape for b in range(2)}
    assert proj == {0: (2 * D, C), 1: (3 * D, C)}
    assert pruned.count_params() == plan.params_after < plan.params_before
    assert_same_outputs(model, pruned, tokens(), tol=1e-5)


def test_opsAttention_channelsAroundHeads_prunedWithThem_exact() -> None:
    model = ops_attention(blocks=1)
    randomize_all(model)
    kill(model, 0, [0], False)
    plan = make_plan(model, PruneSpec(ratio=0.0, head_ratio=0.25, criterion="l1"))
    assert head_groups(plan) == [(4, [1, 2, 3])]
    pruned = apply_plan(model, plan)
    shapes = [pruned.get_layer(n).kernel.shape for n in ("b0_q", "b0_k", "b0_v", "b0_proj")]
    assert shapes == [(C, 3 * D)] * 3 + [(3 * D, C)]
    assert_same_outputs(model, pruned, tokens(), tol=1e-5)


def _frozen_reasons(model: keras.Model) -> list[str]:
    graph = analyze(model)
    return [r for g in graph.groups() if g.kind == "heads" for r in g.frozen]


def test_scoresLeavingThePattern_freezeHeadsWithTheReason() -> None:
    inp = keras.Input((N, C))
    q, k, v = _heads(L.Dense(C)(inp)), _heads(L.Dense(C)(inp)), _heads(L.Dense(C)(inp))
    scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
    bias = ops.reshape(L.Dense(H * N)(inp)[:, :1, :], (-1, H, 1, N))
    y = ops.transpose(ops.matmul(ops.softmax(scores + bias), v), (0, 2, 1, 3))
    model = keras.Model(inp, L.Dense(C)(ops.reshape(y, (-1, N, C))))
    assert any("the per-head tensor goes to Add" in r for r in _frozen_reasons(model))
    assert all(g.frozen for g in analyze(model).groups() if g.kind == "heads")


def test_perHeadTensorAsOutput_orOverHeadAxis_freezesHeads() -> None:
    inp = keras.Input((N, C))
    q, k = _heads(L.Dense(C)(inp)), _heads(L.Dense(C)(inp))
    scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
    assert any("is an output" in r for r in _frozen_reasons(keras.Model(inp, scores)))
    over_heads = ops.softmax(scores, axis=1)
    reasons = _frozen_reasons(keras.Model(inp, ops.mean(over_heads, axis=(1, 2))))
    assert any("softmax over axis 1" in r for r in reasons)


def test_unmatchedMerge_freezesWithTheNotTracedReason() -> None:
    inp = keras.Input((N, C))
    v = ops.reshape(L.Dense(C)(inp), (-1, N, H, D))  # never transposed: merge of (N, h)
    y = ops.reshape(ops.transpose(v, (0, 2, 1, 3)), (-1, H, N * D))
    model = keras.Model(inp, L.Dense(3)(y))
    graph = analyze(model)
    assert any("heads are not traced" in why for _, _, why in graph.unsupported)
    assert all(g.frozen for g in graph.groups() if g.kind == "heads")


def test_kerasHubMiT_attentionHeadsPruned_deadHeadRemovedExactly() -> None:
    pytest.importorskip("keras_hub")
    from . import hub_models

    keras.utils.set_random_seed(3)
    model, side = hub_models.build("MiTBackbone")
    hub_models.randomize(model)
    attn = model.get_layer("hierarchical_encoder_1_0").attn  # 2 heads of 8 channels
    for dense in (attn.q, attn.k, attn.v):
        kernel, bias = dense.get_weights()
        kernel[:, :8], bias[:8] = 0.0, 0.0
        dense.set_weights([kernel, bias])
    plan = make_plan(model, PruneSpec(ratio=0.0, head_ratio=0.34, criterion="l1"))
    assert head_groups(plan) == [(1, [0]), (2, [1])]
    pruned = apply_plan(model, plan)
    # The block is rebuilt as its inlined graph: its sub-layers keep their names.
    assert pruned.get_layer(attn.proj.name).kernel.shape == (8, 16)
    assert pruned.get_layer(attn.q.name).kernel.shape == (16, 8)
    assert pruned.count_params() == plan.params_after < plan.params_before
    assert_same_outputs(model, pruned, hub_models.inputs_for(model, side), tol=1e-5)


def test_scoresUsedAndReturnedAsModelOutput_freezeHeads() -> None:
    inp = keras.Input((N, C))
    q, k, v = _heads(L.Dense(C)(inp)), _heads(L.Dense(C)(inp)), _heads(L.Dense(C)(inp))
    scores = ops.softmax(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))))
    y = ops.reshape(ops.transpose(ops.matmul(scores, v), (0, 2, 1, 3)), (-1, N, C))
    reasons = _frozen_reasons(keras.Model(inp, [L.Dense(C)(y), scores]))
    assert any("touches model output" in r for r in reasons)
    assert _frozen_reasons(keras.Model(inp, L.Dense(C)(y))) == []


def test_deadHeadWithValueBias_keptLiveWithANote_neverDroppedSilently() -> None:
    """Its values are the bias (softmax weights sum to one): a constant not folded here."""
    model = ops_attention(blocks=1)
    randomize_all(model)
    for name in ("b0_q", "b0_k", "b0_v"):
        kernel, bias = model.get_layer(name).get_weights()
        kernel[:, :D] = 0.0
        bias[:D] = bias[:D] if name == "b0_v" else 0.0
        model.get_layer(name).set_weights([kernel, bias])
    plan = make_plan(model, PruneSpec(ratio=0.0, head_ratio=0.25, criterion="l1"))
    (heads,) = [g for g in plan.groups if g.kind == "heads"]
    assert 0 in heads.kept and heads.size_after == 3
    assert any("kept as live" in n and "constant" in n for n in heads.notes)


def test_splitReshapeOutsideAttention_staysChannels_withThePlainReason() -> None:
    inp = keras.Input((N, C))
    y = ops.mean(ops.reshape(L.Dense(C, name="d")(inp), (-1, N, H, D)), axis=-1)
    graph = analyze(keras.Model(inp, L.Dense(3)(y)))
    assert not [g for g in graph.groups() if g.kind == "heads"]
    assert any("does not keep the channel axis" in why for _, _, why in graph.unsupported)


def test_scoresReturnedByNestedModel_andUsedOutside_freezeHeads() -> None:
    inp = keras.Input((N, C))
    q, k, v = _heads(L.Dense(C)(inp)), _heads(L.Dense(C)(inp)), _heads(L.Dense(C)(inp))
    scores = ops.softmax(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))))
    y = ops.reshape(ops.transpose(ops.matmul(scores, v), (0, 2, 1, 3)), (-1, N, C))
    inner = keras.Model(inp, [y, scores], name="inner")
    outer_in = keras.Input((N, C))
    y, scores = inner(outer_in)
    out = L.Dense(3, name="reader")(scores)  # reads the scores' last axis outside the block
    model = keras.Model(outer_in, [L.Dense(C)(y), out])
    assert any("reaches" in r for r in _frozen_reasons(model))
