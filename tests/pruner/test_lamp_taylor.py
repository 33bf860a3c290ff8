"""The lamp and taylor criteria: hand-computed scores, LAMP's fair global
ranking, and taylor's need for data."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from secateur.pruner import InvalidSpecError, PruneSpec, analyze, make_plan
from secateur.pruner.compensation import cached_weights
from secateur.pruner.scoring import ScoringContext, l2_normalise, lamp_normalise, score_group

from .conftest import flatten_dense, randomize

layers = keras.layers


def _score(model: Any, layer: str, criterion: str, data: Any = None) -> np.ndarray:
    """The scores of the group whose channels ``layer`` produces."""
    graph = analyze(model)
    group = next(g for g in graph.groups() if layer in g.origins)
    context = ScoringContext(model, data, 8)
    rng = np.random.default_rng(0)
    result = score_group(graph, group, criterion, cached_weights(graph), rng, context)
    assert result.criterion == criterion and result.fallback is None
    return result.scores


def _dense_model() -> Any:
    inp = keras.Input((3,))
    x = layers.Dense(4, name="d1")(inp)
    return keras.Model(inp, layers.Dense(2, name="out")(x))


def test_lampNormalise_isEachValueOverTheNotSmallerOnes() -> None:
    v = np.array([4.0, 1.0, 9.0, 1.0])
    # ascending (stable): 1 (index 1), 1 (index 3), 4, 9
    expected = [4 / 13, 1 / 15, 9 / 9, 1 / 14]
    np.testing.assert_allclose(lamp_normalise(v), expected)


def test_lamp_scoresADenseLayerByHand() -> None:
    model = _dense_model()
    kernel = np.array([[2, 1, 0, 1], [0, 0, 3, 0], [0, 0, 0, 0]], dtype="float32")
    model.get_layer("d1").set_weights([kernel, np.zeros(4, "float32")])
    # squared filter norms 4, 1, 9, 1 (the bias is not a filter)
    np.testing.assert_allclose(_score(model, "d1", "lamp"), [4 / 13, 1 / 15, 1.0, 1 / 14])


def _two_scales() -> Any:
    """Two conv layers whose weights differ in scale by 10^4."""
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, 3, padding="same", name="big")(inp)
    x = layers.ReLU()(x)
    x = layers.Conv2D(16, 3, padding="same", name="small")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, layers.Dense(3, name="head")(x))
    for name, scale in (("big", 100.0), ("small", 0.01)):
        k, b = model.get_layer(name).get_weights()
        model.get_layer(name).set_weights([k * scale, b])
    return model


def test_lampGlobal_prunesEveryLayer_whereGlobalL1EmptiesTheSmallOne() -> None:
    model = _two_scales()
    by_l1 = make_plan(model, PruneSpec(ratio=0.5, criterion="l1")).layer_widths
    by_lamp = make_plan(model, PruneSpec(ratio=0.5, criterion="lamp")).layer_widths
    assert by_l1["small"] == (16, 1) and by_l1["big"] == (16, 15)
    assert 2 <= by_lamp["small"][1] <= 14 and 2 <= by_lamp["big"][1] <= 14
    assert by_lamp["small"][1] + by_lamp["big"][1] == 16


def _ce_grad(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """d mean softmax cross-entropy / d logits."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return p / len(labels)


def test_taylor_scoresADenseLayerByHand() -> None:
    model = _dense_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype("float32")
    y = np.array([0, 1, 1, 0, 1])
    w1, b1 = model.get_layer("d1").get_weights()
    w2, b2 = model.get_layer("out").get_weights()
    a = x @ w1 + b1
    g = _ce_grad(a @ w2 + b2, y) @ w2.T
    halves = [(x[:3], y[:3]), (x[3:], y[3:])]  # two batches: their scores add up
    g_halves = np.concatenate([_ce_grad(a[:3] @ w2 + b2, y[:3]), _ce_grad(a[3:] @ w2 + b2, y[3:])])
    expected = l2_normalise(np.abs(a * (g_halves @ w2.T)).sum(axis=0))
    np.testing.assert_allclose(_score(model, "d1", "taylor", halves), expected, rtol=1e-4)
    np.testing.assert_allclose(
        _score(model, "d1", "taylor", [(x, y)]), l2_normalise(np.abs(a * g).sum(axis=0)), rtol=1e-4
    )


def test_taylor_scoresAConvLayerByHand() -> None:
    inp = keras.Input((5, 5, 2))
    conv = layers.Conv2D(3, 3, padding="same", name="c")
    a_t = conv(inp)
    x = layers.GlobalAveragePooling2D()(a_t)
    model = keras.Model(inp, layers.Dense(2, name="out")(x))
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 5, 5, 2)).astype("float32")
    labels = np.array([0, 1, 0, 1])
    a = np.asarray(keras.Model(inp, a_t)(images))
    w, b = model.get_layer("out").get_weights()
    dpool = _ce_grad(a.mean(axis=(1, 2)) @ w + b, labels) @ w.T  # (N, C)
    g = dpool[:, None, None, :] / 25.0  # the mean spreads it over 5 x 5 positions
    expected = l2_normalise(np.abs((a * g).sum(axis=(1, 2))).sum(axis=0))
    np.testing.assert_allclose(
        _score(model, "c", "taylor", [(images, labels)]), expected, rtol=1e-4
    )


def test_l2Normalise_isUnitNormAndKeepsZeros() -> None:
    np.testing.assert_allclose(l2_normalise(np.array([3.0, 0.0, 4.0])), [0.6, 0.0, 0.8])
    np.testing.assert_array_equal(l2_normalise(np.zeros(3)), np.zeros(3))


def test_taylor_aChannelMultipliedByZeroDownstream_scoresZero_andTheLoudestRanksFirst() -> None:
    model = _dense_model()
    kernel = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype="float32")
    model.get_layer("d1").set_weights([kernel * [[1, 5, 1, 1]], np.zeros(4, "float32")])
    head = np.array([[1, -1], [2, -2], [0, 0], [1, -1]], dtype="float32")  # unit 2 is unused
    model.get_layer("out").set_weights([head, np.zeros(2, "float32")])
    x = np.random.default_rng(3).normal(size=(16, 3)).astype("float32")
    scores = _score(model, "d1", "taylor", [(x, np.zeros(16, "int64"))])
    assert scores[2] == 0.0 and scores[3] == 0.0  # unused downstream / no input feeds it
    assert int(np.argmax(scores)) == 1  # 5x the activation and 2x the gradient of unit 0


def _strong_and_weak() -> Any:
    """Two parallel 16-unit branches; the weak one's way to the logits is 1000 times fainter."""
    inp = keras.Input((6,))
    strong = layers.ReLU()(layers.Dense(16, name="strong")(inp))
    weak = layers.ReLU()(layers.Dense(16, name="weak")(inp))
    x = layers.Concatenate()([strong, layers.Rescaling(1e-3)(weak)])
    return keras.Model(inp, layers.Dense(3, name="head")(x))


def test_taylorGlobal_prunesEveryLayer_whereRawScoresEmptyTheWeakOne() -> None:
    """Summed single-channel Taylor estimates are not additive: ranked raw across layers
    they emptied whole layers (the CIFAR VGG's fc1 kept 1 of 64 at 30%); scores
    normalised per layer, as Molchanov et al. do, leave every layer a share."""
    keras.utils.set_random_seed(4)
    model = _strong_and_weak()
    rng = np.random.default_rng(4)
    data = [(rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32))]
    widths = make_plan(model, PruneSpec(ratio=0.5, criterion="taylor"), data=data).layer_widths
    assert 4 <= widths["weak"][1] <= 12 and 4 <= widths["strong"][1] <= 12
    assert widths["weak"][1] + widths["strong"][1] == 16


def test_taylor_withoutData_isRefusedNamingCriterionAndData() -> None:
    model = randomize(flatten_dense())
    with pytest.raises(InvalidSpecError, match=r"taylor.*train_data") as info:
        make_plan(model, PruneSpec(criterion="taylor"))
    assert info.value.field == "criterion" and "Received:" in str(info.value)


def test_taylor_makePlan_usesTheBatchesAndLeavesTheModelAsItWas() -> None:
    model = randomize(flatten_dense())
    rng = np.random.default_rng(2)
    batches = [
        (rng.normal(size=(8, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 8)) for _ in range(3)
    ]
    before = model.predict(batches[0][0], verbose=0)
    spec = PruneSpec(ratio=0.5, criterion="taylor", taylor_batches=2)
    plan = make_plan(model, spec, data=batches)
    assert {g.criterion for g in plan.groups if g.pruned} == {"taylor"}
    assert plan.spec["taylor_batches"] == 2
    np.testing.assert_array_equal(model.predict(batches[0][0], verbose=0), before)
    assert "call" not in model.get_layer("bn1").__dict__  # the recording hook is gone


def test_taylorBatches_outOfRange_isRefused() -> None:
    with pytest.raises(InvalidSpecError, match="taylor_batches") as info:
        PruneSpec(criterion="taylor", taylor_batches=0)
    assert info.value.field == "taylor_batches"
