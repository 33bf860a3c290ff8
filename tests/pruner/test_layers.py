"""Every registered layer kind: traced, pruned and exact on dead channels."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import pytest

from secateur.pruner import PruneSpec, analyze, apply_plan, make_plan, supported_layers

from .conftest import assert_same_outputs, kill_pruned_channels, randomize

L = keras.layers


def _wrap(shape, body: Callable, head: int = 3, name: str = "m"):
    """conv/dense producer -> body -> consumer; body's channels are prunable."""
    inp = keras.Input(shape)
    x = body(inp)
    x = L.Flatten()(x) if len(x.shape) > 2 else x
    return keras.Model(inp, L.Dense(head, name="head")(x), name=name)


def conv_bn(filters, rank=2, name="p"):
    conv = {1: L.Conv1D, 2: L.Conv2D, 3: L.Conv3D}[rank]

    def f(x):
        x = conv(filters, 3, padding="same", name=name)(x)
        return L.BatchNormalization(name=name + "_bn")(x)

    return f


def seq(*fns):
    def f(x):
        for fn in fns:
            x = fn(x)
        return x

    return f


CASES: dict[str, tuple[tuple[int, ...], Callable]] = {
    "conv1d": ((10, 3), seq(conv_bn(8, 1), L.ReLU(), L.Conv1D(6, 3, name="c"))),
    "conv3d": ((4, 6, 6, 2), seq(conv_bn(8, 3), L.ReLU(), L.Conv3D(4, 1, name="c"))),
    "conv2d_transpose": (
        (6, 6, 3),
        seq(
            L.Conv2DTranspose(8, 3, strides=2, padding="same", name="t1"),
            L.ReLU(),
            L.Conv2DTranspose(6, 3, name="t2"),
            L.ReLU(),
            L.Conv2D(4, 1, name="c"),
        ),
    ),
    "conv1d_transpose": ((6, 3), seq(L.Conv1DTranspose(8, 3, name="t1"), L.Conv1D(4, 1, name="c"))),
    "depthwise_dm1": (
        (8, 8, 3),
        seq(conv_bn(10), L.ReLU(), L.DepthwiseConv2D(3, padding="same", name="dw"), L.Conv2D(4, 1)),
    ),
    "depthwise_dm2": (
        (8, 8, 3),
        seq(
            conv_bn(6),
            L.DepthwiseConv2D(3, depth_multiplier=2, name="dw"),
            L.BatchNormalization(name="dw_bn"),
            L.Conv2D(4, 1),
        ),
    ),
    "separable_dm2": (
        (8, 8, 3),
        seq(
            conv_bn(6),
            L.SeparableConv2D(10, 3, depth_multiplier=2, name="sep"),
            L.BatchNormalization(name="sep_bn"),
            L.Conv2D(4, 1),
        ),
    ),
    "separable1d": (
        (10, 3),
        seq(L.Conv1D(6, 1, name="p"), L.SeparableConv1D(8, 3, name="s"), L.Conv1D(3, 1)),
    ),
    "grouped_as_depthwise": (
        (8, 8, 3),
        seq(conv_bn(8), L.Conv2D(8, 3, groups=8, padding="same", name="gdw"), L.Conv2D(4, 1)),
    ),
    "dense_on_4d": ((4, 4, 3), seq(L.Dense(12, name="d1"), L.ReLU(), L.Dense(5, name="d2"))),
    "dense_on_3d_layernorm": (
        (5, 6),
        seq(L.Dense(12, name="d1"), L.LayerNormalization(name="ln"), L.Dense(5, name="d2")),
    ),
    "activations": (
        (8, 8, 3),
        seq(
            conv_bn(10),
            L.ReLU(6.0),
            L.LeakyReLU(0.1),
            L.ELU(),
            L.Activation("swish"),
            L.PReLU(shared_axes=[1, 2]),
            L.Conv2D(4, 1),
        ),
    ),
    "prelu_full": ((6, 6, 3), seq(conv_bn(8), L.PReLU(), L.Conv2D(4, 1))),
    "regularization": (
        (8, 8, 3),
        seq(
            conv_bn(10),
            L.Dropout(0.2),
            L.SpatialDropout2D(0.2),
            L.GaussianNoise(0.1),
            L.GaussianDropout(0.1),
            L.ActivityRegularization(0.01),
            L.Conv2D(4, 1),
        ),
    ),
    "pool_pad_crop_upsample": (
        (8, 8, 3),
        seq(
            conv_bn(10),
            L.ZeroPadding2D(1),
            L.MaxPooling2D(2),
            L.UpSampling2D(2),
            L.Cropping2D(1),
            L.AveragePooling2D(2),
            L.Conv2D(4, 1),
        ),
    ),
    "pool_1d_3d": (
        (4, 4, 4, 2),
        seq(
            conv_bn(6, 3),
            L.ZeroPadding3D(1),
            L.MaxPooling3D(2),
            L.UpSampling3D(2),
            L.Cropping3D(1),
            L.Conv3D(3, 1),
        ),
    ),
    "global_pool_keepdims": (
        (8, 8, 3),
        seq(conv_bn(10), L.GlobalAveragePooling2D(keepdims=True), L.Conv2D(4, 1)),
    ),
    "global_max_pool": ((8, 8, 3), seq(conv_bn(10), L.GlobalMaxPooling2D(), L.Dense(4))),
    "reshape_keeps_channels": (
        (4, 4, 3),
        seq(conv_bn(10), L.Reshape((16, 10), name="r"), L.Conv1D(4, 1)),
    ),
    "reshape_flattens": ((4, 4, 3), seq(conv_bn(10), L.Reshape((160,), name="r"), L.Dense(4))),
    "flatten_dense": ((4, 4, 3), seq(conv_bn(10), L.Flatten(), L.Dense(6, name="fc"))),
    "repeat_vector": ((6,), seq(L.Dense(10, name="d"), L.RepeatVector(3), L.Dense(4))),
    "permute_keeps_last": ((4, 5, 3), seq(conv_bn(8), L.Permute((2, 1, 3)), L.Conv2D(4, 1))),
}


def _merge_case(merge_cls):
    def body(x):
        a = conv_bn(8, name="pa")(x)
        b = conv_bn(8, name="pb")(x)
        return L.Conv2D(4, 1)(merge_cls(name="merge")([a, b]))

    return body


for _cls in (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum):
    CASES[f"merge_{_cls.__name__.lower()}"] = ((6, 6, 3), _merge_case(_cls))


def _concat_case(x):
    a = conv_bn(6, name="pa")(x)
    b = conv_bn(4, name="pb")(x)
    c = L.Concatenate(name="cat")([a, b, a])
    c = L.BatchNormalization(name="cat_bn")(c)
    return L.Conv2D(4, 1)(c)


CASES["concatenate_offsets"] = ((6, 6, 3), _concat_case)


def _ops_case(x):
    a = conv_bn(8, name="pa")(x)
    b = conv_bn(8, name="pb")(x)
    # Constants are scalars; an added constant would revive dead channels,
    # so this graph only scales (x + 3 is covered by the MobileNetV3 zoo test).
    y = keras.ops.multiply(a, b) - b * 0.5
    return L.Conv2D(4, 1)(y / 6.0)


CASES["keras_ops_arithmetic"] = ((6, 6, 3), _ops_case)


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_deadChannels_prunedExactly(case: str) -> None:
    shape, body = CASES[case]
    model = randomize(_wrap(shape, body, name=case))
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="random", seed=1))
    assert plan.removed_channels > 0, plan.unsupported_layers
    assert plan.unsupported_layers == []
    kill_pruned_channels(model, plan)
    pruned = apply_plan(model, plan)
    assert pruned.count_params() == plan.params_after < model.count_params()
    x = np.random.default_rng(0).normal(size=(3, *shape)).astype("float32")
    if case == "dense_on_3d_layernorm":
        # LayerNormalization normalises over the channels: removing even dead
        # channels changes its statistics. The plan must say so.
        assert any("LayerNormalization" in n for g in plan.groups for n in g.notes)
        assert pruned(x).shape == model(x).shape
        return
    assert_same_outputs(model, pruned, x)


def test_embedding_prunedExactly() -> None:
    inp = keras.Input((5,), dtype="int32")
    x = L.Embedding(20, 12, name="emb")(inp)
    x = L.Dense(8, name="d")(x)
    x = L.GlobalAveragePooling1D()(x)
    model = keras.Model(inp, L.Dense(2)(x))
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="l1"))
    kill_pruned_channels(model, plan)
    pruned = apply_plan(model, plan)
    assert pruned.get_layer("emb").output_dim < 12
    assert_same_outputs(model, pruned, np.arange(10).reshape(2, 5).astype("int32"))


def test_inputPreprocessing_rescalingAndNormalization_traced() -> None:
    inp = keras.Input((6, 6, 3))
    x = L.Rescaling(1 / 255.0)(inp)
    x = L.Normalization(mean=[0.1, 0.2, 0.3], variance=[1.0, 2.0, 3.0])(x)
    x = conv_bn(8)(x)
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(x)))
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="random"))
    assert plan.removed_channels == 4
    kill_pruned_channels(model, plan)
    assert_same_outputs(model, apply_plan(model, plan), np.ones((2, 6, 6, 3), "float32"))


class Gate(L.Layer):
    """A custom layer the registry does not know."""

    def call(self, x):
        return x * keras.ops.sigmoid(keras.ops.mean(x, axis=-1, keepdims=True))


def test_unknownLayer_freezesItsGroups_reportsNameAndClass() -> None:
    inp = keras.Input((6, 6, 3))
    a = conv_bn(8, name="free")(inp)
    b = conv_bn(8, name="gated")(L.ReLU()(a))
    b = Gate(name="my_gate")(b)
    model = randomize(keras.Model(inp, L.Dense(2)(L.Flatten()(L.Conv2D(4, 1)(b)))))
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion="random"))
    assert plan.unsupported_layers == [
        {"layer": "my_gate", "class": "Gate", "reason": "layer class is not in the registry"}
    ]
    by_origin = {g.origins[0]: g for g in plan.groups}
    assert not by_origin["gated"].pruned
    assert any("my_gate" in r and "Gate" in r for r in by_origin["gated"].frozen)
    assert by_origin["free"].pruned
    kill_pruned_channels(model, plan)
    assert_same_outputs(model, apply_plan(model, plan), np.ones((2, 6, 6, 3), "float32"))


def test_subclassOfRegisteredLayer_trustedOnlyWhenItComputesWhatItsBaseDoes() -> None:
    class MyConv(L.Conv2D):
        pass

    class Doubled(L.Conv2D):
        def call(self, inputs):
            return super().call(inputs) * 2.0

    for cls in (MyConv, Doubled):
        inp = keras.Input((6, 6, 3))
        x = cls(8, 3, name="mine")(inp)
        model = keras.Model(inp, L.Conv2D(2, 1)(x))
        groups = {g.origins[0]: g for g in analyze(model).groups()}
        if cls is MyConv:
            assert groups["mine"].prunable
        else:
            assert any(
                "Doubled" in r and "a subclass of Conv2D" in r for r in groups["mine:0"].frozen
            )


@pytest.mark.parametrize(
    "make,why",
    [
        (
            # Groups of 3 input channels would straddle 'p' (4) and the other conv (2).
            lambda x: L.Conv2D(8, 3, groups=2)(
                L.Concatenate()([L.Conv2D(4, 1, name="p")(x), L.Conv2D(2, 1)(x)])
            ),
            "grouped convolution",
        ),
        (lambda x: L.Softmax()(L.Conv2D(4, 1, name="p")(x)), "softmax"),
        (lambda x: L.Activation("softmax")(L.Conv2D(4, 1, name="p")(x)), "softmax"),
        (
            lambda x: L.Reshape((16, 2, 2))(L.Conv2D(4, 1, name="p")(x)),
            "does not keep the channel axis",
        ),
        (lambda x: L.Permute((3, 1, 2))(L.Conv2D(4, 1, name="p")(x)), "moves the channel axis"),
        (
            lambda x: L.BatchNormalization(axis=1)(L.Conv2D(4, 1, name="p")(x)),
            "only the channel axis",
        ),
    ],
)
def test_unsafeConfigurations_freezeWithReason(make, why) -> None:
    inp = keras.Input((4, 4, 3))
    y = make(inp)
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(y)))
    plan = make_plan(model, PruneSpec(ratio=0.5))
    group = next(g for g in plan.groups if "p" in g.origins)
    assert not group.pruned
    assert any(why in r for r in group.frozen), group.frozen


def test_registry_listsTheDesignedLayers() -> None:
    names = {n.rsplit(".", 1)[-1] for n in supported_layers()}
    for cls in (
        "Conv1D", "Conv2D", "Conv3D", "Conv2DTranspose", "DepthwiseConv2D", "SeparableConv2D",
        "Dense", "BatchNormalization", "LayerNormalization", "Activation", "ReLU", "PReLU",
        "Dropout", "MaxPooling2D", "GlobalAveragePooling2D", "ZeroPadding2D", "Cropping2D",
        "UpSampling2D", "Flatten", "Reshape", "Add", "Subtract", "Multiply", "Average",
        "Maximum", "Minimum", "Concatenate", "Rescaling", "Normalization",
    ):  # fmt: skip
        assert cls in names, cls
