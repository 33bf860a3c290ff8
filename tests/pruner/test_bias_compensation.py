"""Bias compensation: removed channels' constant outputs move into the next bias."""

from __future__ import annotations

import json
from typing import Any

import keras
import numpy as np
import pytest

from secateur.pruner import InvalidSpecError, PruneSpec, PruningPlan, apply_plan, make_plan

layers = keras.layers


def _outputs(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


def _assert_exact(a: Any, b: Any, x: np.ndarray) -> None:
    ya, yb = _outputs(a, x), _outputs(b, x)
    scale = max(1.0, float(np.max(np.abs(ya))))
    np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-5 * scale)


def _set_bn(model: Any, name: str, gamma: dict[int, float], beta: dict[int, float]) -> None:
    """Give a BatchNorm non-trivial statistics, then pin some gammas/betas."""
    layer = model.get_layer(name)
    rng = np.random.default_rng(len(name))
    n = layer.gamma.shape[0]
    g, b = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n)
    mean, var = rng.normal(0, 0.3, n), rng.uniform(0.5, 2.0, n)
    for i, v in gamma.items():
        g[i] = v
    for i, v in beta.items():
        b[i] = v
    layer.set_weights([w.astype("float32") for w in (g, b, mean, var)])


def _group(plan: PruningPlan, origin: str) -> Any:
    return next(g for g in plan.groups if origin in g.origins)


# -- (a) BatchNorm gamma 0, beta not: the channel outputs relu(beta) -----------

DEAD = {1: 0.0, 3: 0.0, 6: 0.0}
BETA = {1: 0.7, 3: -0.4, 6: 1.3}  # relu: 0.7, 0, 1.3


def conv_chain(kernel: int, padding: str, use_bias: bool = True) -> Any:
    inp = keras.Input((9, 9, 3))
    x = layers.Conv2D(8, 3, name="c1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(6, kernel, padding=padding, use_bias=use_bias, name="c2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(3, name="head")(x))


def dense_chain(use_bias: bool) -> Any:
    inp = keras.Input((10,))
    x = layers.Dense(8, name="d1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    x = layers.Dense(6, use_bias=use_bias, name="d2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU()(x)
    return keras.Model(inp, layers.Dense(3, name="head")(x))


def gap_dense() -> Any:
    inp = keras.Input((7, 7, 3))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(6, name="d2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU()(x)
    return keras.Model(inp, layers.Dense(3, name="head")(x))


CHAINS = {
    "conv_valid3x3": (lambda: conv_chain(3, "valid"), (9, 9, 3)),
    "conv_1x1_same": (lambda: conv_chain(1, "same"), (9, 9, 3)),
    "conv_valid_nobias": (lambda: conv_chain(3, "valid", use_bias=False), (9, 9, 3)),
    "dense": (lambda: dense_chain(True), (10,)),
    "dense_nobias": (lambda: dense_chain(False), (10,)),
    "gap_dense": (gap_dense, (7, 7, 3)),
}


def _zero_gamma_plan(name: str, compensate: bool = True) -> tuple[Any, Any, PruningPlan]:
    builder, shape = CHAINS[name]
    model = builder()
    _set_bn(model, "bn1", DEAD, BETA)
    _set_bn(model, "bn2", {}, {})
    x = np.random.default_rng(0).normal(size=(6, *shape)).astype("float32")
    # bn_scale, global: the three zero gammas are the lowest of 14 channels.
    spec = PruneSpec(ratio=3 / 14, criterion="bn_scale", bias_compensation=compensate)
    return model, x, make_plan(model, spec)


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_compensation_zeroGammaChannelsRemoved_sameOutputs(name: str) -> None:
    model, x, plan = _zero_gamma_plan(name)
    first = _group(plan, "c1" if "c1" in {o for g in plan.groups for o in g.origins} else "d1")
    assert sorted(set(range(8)) - set(first.kept)) == [1, 3, 6]
    assert first.compensated == [1, 6]  # channel 3's relu(beta) is 0: nothing to fold
    pruned = apply_plan(model, plan)
    _assert_exact(model, pruned, x)
    assert pruned.count_params() == plan.params_after


@pytest.mark.parametrize("name", ["conv_valid_nobias", "dense_nobias"])
def test_compensation_consumerWithoutBias_gainsOne(name: str) -> None:
    model, _, plan = _zero_gamma_plan(name)
    assert plan.bias_added == ["c2" if name.startswith("conv") else "d2"]
    pruned = apply_plan(model, plan)
    consumer = pruned.get_layer(plan.bias_added[0])
    assert consumer.get_config()["use_bias"] and consumer.bias is not None


@pytest.mark.parametrize("name", ["conv_valid3x3", "dense_nobias"])
def test_compensation_off_dropsConstantsAsBefore(name: str) -> None:
    model, x, plan = _zero_gamma_plan(name, compensate=False)
    assert plan.spec["bias_compensation"] is False
    assert not plan.bias_added and not any(g.compensated for g in plan.groups)
    pruned = apply_plan(model, plan)
    assert pruned.count_params() == plan.params_after
    assert np.max(np.abs(_outputs(pruned, x) - _outputs(model, x))) > 1e-3


def test_compensation_smallGammas_closerThanDropping() -> None:
    model = conv_chain(3, "valid")
    _set_bn(model, "bn1", {1: 1e-3, 3: 2e-3, 6: 3e-3}, BETA)
    _set_bn(model, "bn2", {}, {})
    x = np.random.default_rng(1).normal(size=(8, 9, 9, 3)).astype("float32")
    errors = []
    for compensate in (False, True):
        spec = PruneSpec(ratio=3 / 14, criterion="bn_scale", bias_compensation=compensate)
        pruned = apply_plan(model, make_plan(model, spec))
        errors.append(np.max(np.abs(_outputs(pruned, x) - _outputs(model, x))))
    assert errors[1] < 0.05 * errors[0]


# -- (b) issue 13: a zero filter before sigmoid outputs 0.5 --------------------

REMOVED = [0, 2, 4, 5, 7]


def sigmoid_repro(padding: str = "valid", pad_layer: bool = False) -> Any:
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, name="c1")(inp)
    x = layers.Activation("sigmoid")(x)
    if pad_layer:
        x = layers.ZeroPadding2D(1, name="pad")(x)
    x = layers.Conv2D(4, 3, padding=padding, name="c2")(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, layers.Dense(3, name="head")(x))
    kernel, bias = model.get_layer("c1").get_weights()
    kernel[..., REMOVED] = 0.0
    bias[REMOVED] = 0.0
    model.get_layer("c1").set_weights([kernel, bias])
    return model


def _sigmoid_plan(model: Any, compensate: bool = True) -> PruningPlan:
    # l1, global: the zeroed filters rank lowest; 4 of 12 channels go.
    spec = PruneSpec(ratio=4 / 12, criterion="l1", bias_compensation=compensate)
    plan = make_plan(model, spec)
    assert set(REMOVED) - set(_group(plan, "c1").kept) == {2, 4, 5, 7}
    return plan


X8 = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")


def test_compensation_zeroFilterBeforeSigmoid_sameOutputs() -> None:
    model = sigmoid_repro()
    plan = _sigmoid_plan(model)
    assert _group(plan, "c1").compensated == [2, 4, 5, 7]
    assert not _group(plan, "c1").notes
    _assert_exact(model, apply_plan(model, plan), X8)


def test_compensation_off_zeroFilterBeforeSigmoid_changesOutputs() -> None:
    model = sigmoid_repro()
    pruned = apply_plan(model, _sigmoid_plan(model, compensate=False))
    assert np.max(np.abs(_outputs(pruned, X8) - _outputs(model, X8))) > 0.05


def test_compensation_samePaddedConsumer_exactInsideAndNoted() -> None:
    model = sigmoid_repro("same")
    plan = _sigmoid_plan(model)
    group = _group(plan, "c1")
    assert group.compensated == [2, 4, 5, 7]
    assert len(group.notes) == 4 and all("zero padding" in n for n in group.notes)
    pruned = apply_plan(model, plan)
    dropped = apply_plan(model, plan, bias_compensation=False)

    def c2_error(m: Any) -> np.ndarray:
        sub = keras.Model(m.input, m.get_layer("c2").output)
        return np.asarray(sub(X8)) - np.asarray(keras.Model(model.input, c2_out)(X8))

    c2_out = model.get_layer("c2").output
    error = c2_error(pruned)
    assert np.max(np.abs(error)) > 1e-3  # the note's caveat is real
    # The fold is the least-squares constant: smaller error than dropping,
    # averaging to zero over positions, so the global average after c2
    # stays exact.
    assert np.sqrt(np.mean(error**2)) < np.sqrt(np.mean(c2_error(dropped) ** 2))
    np.testing.assert_allclose(error.mean(axis=(1, 2)), 0.0, atol=1e-5)
    _assert_exact(model, pruned, X8)


def test_compensation_constantLostInPadding_keptAsLive() -> None:
    model = sigmoid_repro(pad_layer=True)
    plan = make_plan(model, PruneSpec(ratio=4 / 12, criterion="l1"))
    group = _group(plan, "c1")
    assert set(REMOVED) <= set(group.kept)
    assert any("kept as live" in n and "'pad'" in n for n in group.notes)


def test_compensation_caveatMissingFromPlan_warns() -> None:
    # As when weights change between planning and applying: the plan
    # carries no caveat, so apply_plan must say it.
    model = sigmoid_repro("same")
    plan = _sigmoid_plan(model, compensate=False)
    with pytest.warns(UserWarning, match="zero padding"):
        apply_plan(model, plan, bias_compensation=True)


# -- the option and the plan format ---------------------------------------------


def test_spec_biasCompensationNotBool_rejected() -> None:
    with pytest.raises(InvalidSpecError, match="bias_compensation") as info:
        PruneSpec(bias_compensation="yes")  # type: ignore[arg-type]
    assert info.value.field == "bias_compensation"


def test_plan_jsonRoundTrip_keepsCompensation() -> None:
    model = sigmoid_repro()
    plan = _sigmoid_plan(model)
    again = PruningPlan.from_dict(json.loads(plan.to_json()))
    assert _group(again, "c1").compensated == [2, 4, 5, 7]
    _assert_exact(model, apply_plan(model, again), X8)


def test_plan_madeBeforeCompensation_loadsAndAppliesAsBefore() -> None:
    model = sigmoid_repro()
    data = json.loads(_sigmoid_plan(model).to_json())
    del data["bias_added"]
    del data["spec"]["bias_compensation"]
    for g in data["groups"]:
        del g["compensated"]
    old = PruningPlan.from_dict(data)
    pruned = apply_plan(model, old)
    assert np.max(np.abs(_outputs(pruned, X8) - _outputs(model, X8))) > 0.05
    _assert_exact(model, apply_plan(model, old, bias_compensation=True), X8)


@pytest.mark.parametrize("out_axis", [-1, -2])
def test_dead_filters_finds_exactly_the_all_zero_filters(out_axis: int) -> None:
    from secateur.pruner.constant_rules import dead_filters

    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 3, 6, 8)).astype("float32")
    kernel[0, 0] = 0.0  # every filter's first entry is zero: all are scanned
    dead = [1, 4]
    index = [slice(None)] * 4
    index[out_axis] = dead
    kernel[tuple(index)] = 0.0
    n = kernel.shape[out_axis]
    expected = np.isin(np.arange(n), dead)
    np.testing.assert_array_equal(dead_filters(kernel, out_axis), expected)
    kernel[0, 0] = 1.0  # first entries non-zero again: the dead ones stay found
    kernel[tuple(index)] = 0.0
    np.testing.assert_array_equal(dead_filters(kernel, out_axis), expected)


@pytest.mark.parametrize(
    "fn",
    [
        keras.activations.relu,
        keras.activations.sigmoid,
        keras.activations.silu,
        keras.activations.tanh,
        layers.ReLU(6.0),
        layers.ReLU(),
        layers.ReLU(negative_slope=0.1),
    ],
    ids=["relu", "sigmoid", "silu", "tanh", "relu6_layer", "relu_layer", "leaky_relu_layer"],
)
def test_activations_evaluated_in_numpy_match_keras(fn: Any) -> None:
    from secateur.pruner.constants import _evaluate

    points = np.linspace(-12.0, 12.0, 97, dtype=np.float32).astype(np.float64).reshape(1, -1)
    expected = np.asarray(keras.ops.convert_to_numpy(fn(points.astype("float32"))), np.float64)
    np.testing.assert_allclose(_evaluate(fn, points), expected, rtol=1e-6, atol=1e-6)
