"""Surgery rebuilds node by node: renamed layers, Backbone subclasses, layers
that do not round-trip through their config, keras.ops nodes with config
edits, and no variable shared with the original."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from secateur.pruner import PruneSpec, analyze, apply_plan, make_plan
from secateur.pruner.errors import UnsupportedModelError
from secateur.pruner.graph import ConfigEdit
from secateur.pruner.handlers import Call, handler_for, register_handler
from secateur.pruner.layout import Layout, kept_positions

from . import hub_models
from .conftest import assert_same_outputs, images, kill_pruned_channels, randomize

L = keras.layers
SPEC = PruneSpec(ratio=0.5, criterion="l1")
_CONV = handler_for(L.Conv2D(1, 1))


# -- test-only layers and operations ------------------------------------------


class RenamingConv(L.Conv2D):
    """Appends "_0" to its name on every construction, as keras-hub blocks do."""

    def __init__(self, *args: Any, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, name=None if name is None else f"{name}_0", **kwargs)


class NoRoundTrip(L.Layer):
    """A custom layer whose config omits a constructor argument."""

    def __init__(self, units: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.dense = L.Dense(units)

    def call(self, x: Any) -> Any:
        return self.dense(x)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "trainable": self.trainable, "dtype": self.dtype_policy.name}


class NoRoundTripConv(L.Conv2D):
    """A Conv2D (registered like one) whose config cannot re-create it."""

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("filters")
        return config


class PickyConv(L.Conv2D):
    """Round-trips, but refuses to build at any width but 8."""

    def build(self, input_shape: Any) -> None:
        if self.filters != 8:
            raise ValueError(f"PickyConv builds with 8 filters only, not {self.filters}")
        super().build(input_shape)


class ScaleOp(keras.Operation):
    """``x * ones(size)``: fails unless ``size`` follows the channel count."""

    def __init__(self, size: int, name: str | None = None) -> None:
        super().__init__(name=name)
        self.size = size

    def call(self, x: Any) -> Any:
        return x * keras.ops.ones((self.size,), dtype=x.dtype)

    def get_config(self) -> dict[str, Any]:
        return {"size": self.size, "name": self.name}


class ShapeOp(keras.Operation):
    """``x + zeros(shape)``: the channel count sits in a list (a ``compute`` edit)."""

    def __init__(self, shape: list[int], name: str | None = None) -> None:
        super().__init__(name=name)
        self.shape = list(shape)

    def call(self, x: Any) -> Any:
        return x + keras.ops.zeros(self.shape, dtype=x.dtype)

    def get_config(self) -> dict[str, Any]:
        return {"shape": self.shape, "name": self.name}


class ArgOp(keras.Operation):
    """``x * ones(n)`` with ``n`` a call argument (a ``call:1`` edit)."""

    def call(self, x: Any, n: int) -> Any:
        return x * keras.ops.ones((n,), dtype=x.dtype)


def _count(layout: Layout) -> Any:
    return lambda old, kept: [*old[:-1], len(kept_positions(layout, kept))]


@register_handler(ScaleOp)
def _scale_op(c: Call) -> list[Layout]:
    c.edit("size", c.x)
    return [c.x]


@register_handler(ShapeOp)
def _shape_op(c: Call) -> list[Layout]:
    c.graph.add_edit(ConfigEdit(c.path, "shape", c.x, compute=_count(c.x)))
    return [c.x]


@register_handler(ArgOp)
def _arg_op(c: Call) -> list[Layout]:
    n = lambda old, kept: len(kept_positions(c.x, kept))  # noqa: E731
    c.graph.add_edit(ConfigEdit(c.path, "call:1", c.x, compute=n))
    return [c.x]


register_handler(RenamingConv, NoRoundTripConv, PickyConv)(_CONV)


# -- models -------------------------------------------------------------------


def _conv_bn(x: Any, filters: int, name: str, cls: Any = L.Conv2D) -> Any:
    x = cls(filters, 3, padding="same", name=name)(x)
    x = L.BatchNormalization(name=name + "_bn")(x)
    return L.ReLU()(x)


def _head(inp: Any, x: Any, name: str) -> Any:
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, name="head")(x), name=name)


def renaming_model() -> Any:
    inp = keras.Input((8, 8, 3))
    x = _conv_bn(inp, 8, "a")
    x = _conv_bn(x, 8, "b", RenamingConv)
    x = _conv_bn(x, 8, "c")
    return _head(inp, x, "renaming")


def no_round_trip_model(changed: bool) -> Any:
    inp = keras.Input((8, 8, 3))
    x = _conv_bn(inp, 8, "a")
    x = _conv_bn(x, 8, "bad", NoRoundTripConv if changed else L.Conv2D)
    x = _conv_bn(x, 8, "c")
    x = _conv_bn(x, 8, "d")
    x = NoRoundTrip(6, name="opaque")(x)
    return _head(inp, x, "no_round_trip")


def ops_model() -> Any:
    inp = keras.Input((8, 8, 3))
    x = _conv_bn(inp, 8, "a")
    x = ScaleOp(8, name="scale")(x)
    x = ShapeOp([1, 1, 8], name="shape")(x)
    x = ArgOp(name="arg")(x, 8)
    x = _conv_bn(x, 8, "b")
    return _head(inp, x, "ops")


class TinyBackbone(keras.Model):
    """Built functionally; its config holds constructor arguments, like keras-hub's."""

    def __init__(self, width: int = 8, image_shape: tuple[int, ...] = (8, 8, 3), **kwargs: Any):
        inp = keras.Input(image_shape)
        x = _conv_bn(inp, width, "stem")
        x = _conv_bn(x, width * 2, "mid")
        x = L.Conv2D(width, 1, name="out")(x)
        super().__init__(inputs=inp, outputs=x, **kwargs)
        self.width = width
        self.image_shape = image_shape

    def get_config(self) -> dict[str, Any]:
        return {"width": self.width, "image_shape": self.image_shape, "name": self.name}


def _prune_dead(model: Any, spec: PruneSpec = SPEC) -> tuple[Any, Any]:
    randomize(model)
    plan = make_plan(model, spec)
    assert any(g.size_after < g.size_before for g in plan.groups)
    kill_pruned_channels(model, plan)
    return apply_plan(model, plan), plan


# -- tests --------------------------------------------------------------------


def test_rebuild_layerRenamedByKeras_weightsFollowGraphPosition() -> None:
    model = renaming_model()
    assert model.get_layer("b_0").filters == 8
    pruned, _ = _prune_dead(model)
    new = [layer for layer in pruned.layers if isinstance(layer, RenamingConv)]
    assert len(new) == 1 and new[0].name == "b_0_0"  # re-created: renamed again
    assert new[0].filters < 8
    assert_same_outputs(model, pruned, images((8, 8, 3)))


def test_rebuild_backboneSubclass_prunedAsFunctionalModel() -> None:
    model = TinyBackbone(name="tiny")
    pruned, _ = _prune_dead(model)
    assert type(pruned) is not TinyBackbone and isinstance(pruned, keras.Model)
    assert pruned.count_params() < model.count_params()
    assert pruned.get_layer("mid").filters < 16
    assert_same_outputs(model, pruned, images((8, 8, 3)))


def test_rebuild_unchangedLayerWithoutRoundTrip_copiedExactly() -> None:
    model = no_round_trip_model(changed=False)
    with pytest.raises(TypeError):
        NoRoundTrip.from_config(model.get_layer("opaque").get_config())
    pruned, plan = _prune_dead(model)
    assert plan.layer_widths["bad"][1] < 8
    old, new = model.get_layer("opaque"), pruned.get_layer("opaque")
    assert new is not old and new.units == 6
    for a, b in zip(old.weights, new.weights):
        assert a is not b
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert_same_outputs(model, pruned, images((8, 8, 3)))
    # The no-reload arm cannot re-initialise it: the copy keeps its weights.
    fresh = apply_plan(model, plan, reload_weights=False)
    np.testing.assert_array_equal(fresh.get_layer("opaque").weights[0].numpy(), old.weights[0])


def test_rebuild_changedLayerWithoutRoundTrip_frozenAtPlanWithReason() -> None:
    model = no_round_trip_model(changed=True)
    graph = analyze(model)
    reason = "layer 'bad' (NoRoundTripConv): cannot be re-created from its config"
    frozen = [g for g in graph.groups() if any(reason in r for r in g.frozen)]
    assert {o for g in frozen for o in g.origins} >= {"a", "bad"}
    pruned, plan = _prune_dead(model)
    assert "bad" not in plan.layer_widths and plan.layer_widths["c"][1] < 8
    assert pruned.get_layer("bad").filters == 8
    assert_same_outputs(model, pruned, images((8, 8, 3)))


def test_rebuild_changedLayerFailsToBuild_typedError() -> None:
    inp = keras.Input((8, 8, 3))
    x = _conv_bn(_conv_bn(inp, 8, "picky", PickyConv), 8, "c")
    model = _head(inp, x, "picky")
    plan = make_plan(model, SPEC)
    assert plan.layer_widths["picky"][1] < 8
    with pytest.raises(UnsupportedModelError, match=r"layer 'picky' \(PickyConv\).*8 filters only"):
        apply_plan(model, plan)


def test_rebuild_opsWithConfigAndCallEdits_reappliedExactly() -> None:
    model = ops_model()
    graph = analyze(model)
    assert {(e.layer, e.key) for e in graph.edits.values()} >= {
        ("scale", "size"),
        ("shape", "shape"),
        ("arg", "call:1"),
    }
    pruned, plan = _prune_dead(model)
    assert plan.layer_widths["a"][1] < 8
    ops = {type(op): op for op in pruned.operations}
    assert ops[ScaleOp].size == plan.layer_widths["a"][1]
    assert ops[ShapeOp].shape == [1, 1, plan.layer_widths["a"][1]]
    assert_same_outputs(model, pruned, images((8, 8, 3)))


def test_rebuild_sharesNoVariable_trainingPrunedLeavesOriginal() -> None:
    model = no_round_trip_model(changed=False)
    pruned, _ = _prune_dead(model)
    assert not {id(v) for v in model.weights} & {id(v) for v in pruned.weights}
    before = [w.numpy().copy() for w in model.weights]
    x = images((8, 8, 3))
    y_before = np.asarray(model(x, training=False))
    pruned.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    pruned.fit(x, np.ones((len(x), 3)), epochs=2, verbose=0)
    for var in pruned.weights:
        var.assign(np.zeros(var.shape, dtype=var.dtype))
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())
    np.testing.assert_array_equal(y_before, np.asarray(model(x, training=False)))


def test_rebuild_sequential_staysSequential() -> None:
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(8, 3, name="c1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(),
            L.Conv2D(4, 1, name="c2"),
            L.GlobalAveragePooling2D(),
            L.Dense(2, name="head"),
        ]
    )
    pruned, _ = _prune_dead(model)
    assert isinstance(pruned, keras.Sequential)
    assert pruned.get_layer("c1").filters < 8
    assert_same_outputs(model, pruned, images((8, 8, 3)))


# -- real keras-hub backbones (tiny random configs, no presets) ------------------


@pytest.mark.parametrize("name", ["MobileNetBackbone", "ViTBackbone"])
def test_rebuild_kerasHubBackbone_prunesExactlyWithDeadChannels(name: str) -> None:
    # MobileNet: Keras renames its depthwise blocks on re-creation (block_0_0 ->
    # block_0_0_0); ViT: custom layers that do not round-trip through their config.
    pytest.importorskip("keras_hub")
    model, side = hub_models.build(name)
    pruned, _ = _prune_dead(model, PruneSpec(ratio=0.2, criterion="bn_scale"))
    assert isinstance(pruned, keras.Model)
    assert pruned.count_params() < model.count_params()
    assert not {id(v) for v in model.weights} & {id(v) for v in pruned.weights}
    assert_same_outputs(model, pruned, np.random.default_rng(0).uniform(0, 1, (2, side, side, 3)))
