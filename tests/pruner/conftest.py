"""Model builders and helpers shared by the pruner tests."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest

from secateur.pruner.graph import PRODUCER_ROLES
from secateur.pruner.layout import kept_positions
from secateur.pruner.models import vgg16_bn
from secateur.pruner.plan import PruningPlan, keep_function
from secateur.pruner.tracing import analyze

layers = keras.layers


@pytest.fixture(autouse=True)
def _fresh_keras() -> Any:
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


def randomize(model: Any, seed: int = 0) -> Any:
    """Give BN statistics and gammas non-trivial values so tests can fail."""
    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            values = []
            for w in layer.weights:
                shape = w.shape
                name = w.name
                if name == "moving_variance":
                    values.append(rng.uniform(0.5, 2.0, shape))
                elif name == "gamma":
                    values.append(rng.uniform(0.2, 1.5, shape))
                else:
                    values.append(rng.normal(0, 0.3, shape))
            layer.set_weights([v.astype("float32") for v in values])
        elif (
            isinstance(layer, (layers.Conv2D, layers.Dense))
            and getattr(layer, "bias", None) is not None
        ):
            w = [v.numpy() for v in layer.weights]
            idx = next(i for i, v in enumerate(layer.weights) if v is layer.bias)
            w[idx] = rng.normal(0, 0.1, w[idx].shape).astype("float32")
            layer.set_weights(w)
    return model


def _all_layers(model: Any) -> list[Any]:
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out.extend(_all_layers(layer))
    return out


def kill_pruned_channels(model: Any, plan: PruningPlan) -> None:
    """Zero every parameter that produces a channel the plan removes.

    With a channel's filter, bias, BN gamma/beta and depthwise slices at zero
    the channel is dead, so removing it cannot change the model's outputs.
    """
    graph = analyze(model)
    kept = keep_function(graph, {g.id: np.asarray(g.kept) for g in plan.groups})
    for (path, idx), per_axis in graph.axes.items():
        layer = graph.layers[path]
        values = [w.numpy() for w in layer.weights]
        for axis, ax in per_axis.items():
            # A BatchNorm without gamma (scale=False) maps a zero input to
            # -mean/std + beta: zero its moving mean as well.
            if ax.role not in PRODUCER_ROLES and ax.weight_name != "moving_mean":
                continue
            keep = kept_positions(ax.layout, kept)
            dead = np.setdiff1d(np.arange(values[idx].shape[axis]), keep)
            index = [slice(None)] * values[idx].ndim
            index[axis] = dead
            values[idx][tuple(index)] = 0.0
        layer.set_weights(values)


def assert_same_outputs(
    a: Any, b: Any, x: np.ndarray | list[np.ndarray], tol: float = 1e-4
) -> None:
    ya = a(x, training=False)
    yb = b(x, training=False)
    ya = ya if isinstance(ya, (list, tuple)) else [ya]
    yb = yb if isinstance(yb, (list, tuple)) else [yb]
    for p, q in zip(ya, yb):
        p, q = np.asarray(p), np.asarray(q)
        assert p.shape == q.shape
        scale = max(1.0, float(np.max(np.abs(p))))
        np.testing.assert_allclose(q, p, rtol=tol, atol=tol * scale)


def images(shape: tuple[int, ...], n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, *shape)).astype("float32")


# -- the architectures the exactness tests cover -----------------------------


def study_vgg16_bn() -> Any:
    return vgg16_bn((32, 32, 3), classes=10)


def resnet_projection() -> Any:
    """Two bottleneck stages with projection shortcuts (ResNet-50 style)."""
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(16, 3, padding="same", name="stem")(inp)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU()(x)
    for stage, (width, stride) in enumerate([(8, 1), (16, 2)]):
        for block in range(2):
            s = stride if block == 0 else 1
            name = f"s{stage}b{block}"
            y = layers.Conv2D(width, 1, strides=s, name=f"{name}_c1")(x)
            y = layers.BatchNormalization(name=f"{name}_bn1")(y)
            y = layers.ReLU()(y)
            y = layers.Conv2D(width, 3, padding="same", name=f"{name}_c2")(y)
            y = layers.BatchNormalization(name=f"{name}_bn2")(y)
            y = layers.ReLU()(y)
            y = layers.Conv2D(width * 4, 1, name=f"{name}_c3")(y)
            y = layers.BatchNormalization(name=f"{name}_bn3")(y)
            if block == 0:
                sc = layers.Conv2D(width * 4, 1, strides=s, name=f"{name}_proj")(x)
                sc = layers.BatchNormalization(name=f"{name}_proj_bn")(sc)
            else:
                sc = x
            x = layers.ReLU()(layers.Add(name=f"{name}_add")([y, sc]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(5, name="head")(x), name="resnet_projection")


def densenet_chain() -> Any:
    """Dense blocks: every layer's output is concatenated onto the running stack."""
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(12, 3, padding="same", name="stem")(inp)
    for block in range(2):
        for i in range(3):
            y = layers.BatchNormalization(name=f"d{block}_{i}_bn")(x)
            y = layers.ReLU()(y)
            y = layers.Conv2D(16, 1, name=f"d{block}_{i}_c1")(y)
            y = layers.BatchNormalization(name=f"d{block}_{i}_bn2")(y)
            y = layers.ReLU()(y)
            y = layers.Conv2D(8, 3, padding="same", name=f"d{block}_{i}_c2")(y)
            x = layers.Concatenate(name=f"d{block}_{i}_cat")([x, y])
        x = layers.BatchNormalization(name=f"t{block}_bn")(x)
        x = layers.ReLU()(x)
        x = layers.Conv2D(16, 1, name=f"t{block}_conv")(x)
        x = layers.AveragePooling2D(2, name=f"t{block}_pool")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(4, name="head")(x), name="densenet_chain")


def mobilenetv2_block() -> Any:
    """Inverted residuals: expand 1x1, depthwise 3x3, linear project, add."""
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(16, 3, strides=2, padding="same", name="stem")(inp)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0)(x)
    for i in range(3):
        y = layers.Conv2D(96, 1, use_bias=False, name=f"b{i}_expand")(x)
        y = layers.BatchNormalization(name=f"b{i}_expand_bn")(y)
        y = layers.ReLU(6.0)(y)
        y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"b{i}_dw")(y)
        y = layers.BatchNormalization(name=f"b{i}_dw_bn")(y)
        y = layers.ReLU(6.0)(y)
        y = layers.Conv2D(16, 1, use_bias=False, name=f"b{i}_project")(y)
        y = layers.BatchNormalization(name=f"b{i}_project_bn")(y)
        x = layers.Add(name=f"b{i}_add")([x, y])
    x = layers.Conv2D(64, 1, name="top")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(3, name="head")(x), name="mobilenetv2_block")


def se_block() -> Any:
    """Squeeze-and-excitation: channel gates broadcast over space."""
    inp = keras.Input((12, 12, 3))
    x = layers.Conv2D(32, 3, padding="same", name="conv")(inp)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Activation("swish")(x)
    s = layers.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    s = layers.Conv2D(8, 1, activation="relu", name="se_reduce")(s)
    s = layers.Conv2D(32, 1, activation="sigmoid", name="se_expand")(s)
    x = layers.Multiply(name="excite")([x, s])
    g = layers.GlobalAveragePooling2D()(x)
    g = layers.Reshape((1, 1, 32), name="se2_reshape")(g)
    x = layers.Multiply(name="excite2")([x, g])
    x = layers.Conv2D(16, 1, name="project")(x)
    x = layers.Flatten()(x)
    return keras.Model(inp, layers.Dense(2, name="head")(x), name="se_block")


def flatten_dense() -> Any:
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(10, 3, padding="same", name="conv1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(12, 3, padding="same", name="conv2")(x)
    x = layers.ReLU()(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(20, name="fc1")(x)
    x = layers.ReLU()(x)
    return keras.Model(inp, layers.Dense(3, name="head")(x), name="flatten_dense")


def nested_and_shared() -> Any:
    """A nested Sequential, a nested functional model called twice, a shared conv."""
    inner_in = keras.Input((8, 8, 12))
    t = layers.Conv2D(12, 3, padding="same", name="inner_conv")(inner_in)
    t = layers.BatchNormalization(name="inner_bn")(t)
    inner = keras.Model(inner_in, layers.ReLU()(t), name="inner")
    seq = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(12, 3, padding="same", name="seq_conv"),
            layers.BatchNormalization(name="seq_bn"),
            layers.ReLU(),
        ],
        name="stem",
    )
    inp = keras.Input((8, 8, 3))
    x = seq(inp)
    shared = layers.Conv2D(12, 1, name="shared")
    a = shared(inner(x))
    b = shared(inner(layers.ReLU()(x)))
    x = layers.Concatenate()([a, b])
    x = layers.Conv2D(6, 1, name="mix")(x)
    x = layers.GlobalMaxPooling2D()(x)
    return keras.Model(inp, layers.Dense(2, name="head")(x), name="nested_and_shared")


ARCHITECTURES: dict[str, tuple[Callable[[], Any], tuple[int, ...]]] = {
    "vgg16_bn_cifar": (study_vgg16_bn, (32, 32, 3)),
    "resnet_projection": (resnet_projection, (16, 16, 3)),
    "densenet_chain": (densenet_chain, (16, 16, 3)),
    "mobilenetv2_block": (mobilenetv2_block, (16, 16, 3)),
    "se_block": (se_block, (12, 12, 3)),
    "flatten_dense": (flatten_dense, (8, 8, 3)),
    "nested_and_shared": (nested_and_shared, (8, 8, 3)),
}
