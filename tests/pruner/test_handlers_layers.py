"""EinsumDense, traced like Dense, and composite layers traced through their sub-layers."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from secateur.pruner import PruneSpec, analyze, apply_plan, make_plan
from secateur.pruner.handlers import Unsupported
from secateur.pruner.handlers_layers import einsum_axes
from secateur.pruner.inline import register_inline

from .conftest import assert_same_outputs, kill_pruned_channels, randomize

L = keras.layers


def _einsum_model(equation: str, out_shape, bias_axes, shape, activation=None):
    inp = keras.Input(shape)
    x = L.Dense(12, name="p")(inp)
    x = L.EinsumDense(equation, out_shape, bias_axes=bias_axes, activation=activation, name="e")(x)
    x = L.Dense(5, name="c")(x)
    x = L.Flatten()(x) if len(x.shape) > 2 else x
    return keras.Model(inp, L.Dense(3, name="head")(x))


@pytest.mark.parametrize(
    "equation,out_shape,bias_axes,shape",
    [
        ("ab,bc->ac", 10, "c", (6,)),
        ("abc,cd->abd", (4, 10), "d", (4, 6)),
        ("...b,bc->...c", (10,), None, (3, 4, 6)),
        ("abc,cde->abde", (4, 2, 10), "de", (4, 6)),
    ],
)
def test_einsumDense_deadChannels_prunedExactly(equation, out_shape, bias_axes, shape) -> None:
    model = randomize(_einsum_model(equation, out_shape, bias_axes, shape, activation="relu"))
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="random", seed=3))
    assert plan.unsupported_layers == []
    pruned_groups = {o for g in plan.groups if g.pruned for o in g.origins}
    assert {"p", "e"} <= pruned_groups, pruned_groups
    kill_pruned_channels(model, plan)
    pruned = apply_plan(model, plan)
    assert pruned.count_params() == plan.params_after < model.count_params()
    assert pruned.get_layer("e").kernel.shape[-1] < 10
    x = np.random.default_rng(0).normal(size=(3, *shape)).astype("float32")
    assert_same_outputs(model, pruned, x)


def test_einsumDense_sigmoidOfDeadChannel_isNotDroppedSilently() -> None:
    """sigmoid(0) = 0.5: a 'dead' einsum channel still feeds the next layer."""
    model = randomize(_einsum_model("ab,bc->ac", 10, "c", (6,), activation="sigmoid"))
    spec = PruneSpec(ratio=0.5, criterion="random", seed=3, bias_compensation=True)
    plan = make_plan(model, spec)
    kill_pruned_channels(model, plan)
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    assert_same_outputs(model, apply_plan(model, plan), x)


@pytest.mark.parametrize(
    "equation,why",
    [
        ("abc,bd->acd", "is not contracted"),  # contracts a position axis
        ("ab,bc->ca", "does not come from the kernel"),
        ("abc,c->ab", "does not come from the kernel"),
        ("ab,bb->ab", "not contracted"),
        ("nonsense", "not of the form"),
    ],
)
def test_einsumAxes_unsupportedEquations_sayWhy(equation, why) -> None:
    with pytest.raises(Unsupported, match=why):
        einsum_axes(equation)


def test_einsumDense_biasOverOtherAxes_freezesWithReason() -> None:
    model = _einsum_model("abc,cde->abde", (4, 2, 10), "d", (4, 6))
    groups = {o: g for g in analyze(model).groups() for o in g.origins}
    assert any("bias_axes='d'" in r for r in groups["p"].frozen), groups["p"].frozen


# -- inlining: a composite layer traced through its sub-layers ------------------


class _Bottleneck(L.Layer):
    """Expand, reshape through the batch size (as keras-hub blocks do), project, add."""

    def __init__(self, width: int, expanded: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.width, self.expanded = width, expanded
        self.expand = L.Dense(expanded, name="expand")
        self.norm = L.BatchNormalization(name="norm")
        self.project = L.Dense(width, name="project")

    def call(self, x):
        y = keras.ops.relu(self.norm(self.expand(x)))
        shape = keras.ops.shape(y)
        y = keras.ops.reshape(y, (shape[0], 2, -1, self.expanded))  # batch kept
        y = keras.ops.reshape(y, (shape[0], -1, self.expanded))
        return x + self.project(y)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "expanded": self.expanded}


class _Opaque(_Bottleneck):
    pass


def _block_model(cls):
    inp = keras.Input((6, 4))
    x = L.Dense(8, name="p")(inp)
    x = cls(8, 16, name="b")(x)
    return keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(L.Dense(4, name="c")(x))))


def test_inlinedLayer_expandedWidth_prunedExactly() -> None:
    register_inline(_Bottleneck)
    model = randomize(_block_model(_Bottleneck))
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="random", seed=1))
    assert plan.unsupported_layers == [], plan.unsupported_layers
    pruned = {o for g in plan.groups if g.pruned for o in g.origins}
    assert "b/expand" in pruned, pruned
    kill_pruned_channels(model, plan)
    new = apply_plan(model, plan)
    assert new.count_params() == plan.params_after < model.count_params()
    x = np.random.default_rng(0).normal(size=(5, 6, 4)).astype("float32")  # a new batch size
    assert_same_outputs(model, new, x)


def test_layerNotRegisteredForInlining_staysOpaque() -> None:
    register_inline(_Bottleneck)
    model = _block_model(_Opaque)
    assert [(p, c) for p, c, _ in analyze(model).unsupported] == [("b", "_Opaque")]


# -- layer scale written as a custom class ----------------------------------------


class _LayerScale(L.Layer):
    """What model code writes: one factor per channel."""

    def __init__(self, dim: int, init: float = 1e-2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dim, self.init = dim, init
        self.gamma = self.add_weight(shape=(dim,), initializer="ones", name="gamma")

    def call(self, x):
        return x * self.gamma

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "init": self.init}


class _ScaleAndShift(_LayerScale):
    """Not a scale: it also adds one, so a dead channel outputs a constant."""

    def call(self, x):
        return x * self.gamma + 1.0


def _scale_model(cls):
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, padding="same", name="p")(inp)
    x = cls(8, name="ls")(x)
    x = L.Conv2D(4, 1, name="c")(x)
    return keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(x)))


def test_customLayerScale_recognised_prunedExactly() -> None:
    model = randomize(_scale_model(_LayerScale))
    model.get_layer("ls").set_weights([np.linspace(0.5, 2.0, 8).astype("float32")])
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="random", seed=1))
    assert plan.unsupported_layers == []
    assert any(g.pruned and "p" in g.origins for g in plan.groups)
    kill_pruned_channels(model, plan)
    new = apply_plan(model, plan)
    assert new.get_layer("ls").dim == new.get_layer("ls").gamma.shape[0] < 8
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    assert_same_outputs(model, new, x)


def test_customLayerThatIsNotAScale_staysOpaque() -> None:
    model = _scale_model(_ScaleAndShift)
    assert [(p, c) for p, c, _ in analyze(model).unsupported] == [("ls", "_ScaleAndShift")]
