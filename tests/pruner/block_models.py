"""Small blocks in the shape real model code writes them, for the exactness tests.

Each builder returns a functional model around one pattern: normalisation
over the channels inside a block, custom per-channel layers written as
their own classes, attention variants (separate q and kv projections, kv
from a pooled input, channel attention, heads through Permute, token-mixing
MLPs) and reshapes whose factorisation depends on the width. Nothing here
is tuned to a model list: each block is the textbook form of the pattern.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

L = keras.layers
ops = keras.ops

# -- custom layers as model authors write them ---------------------------------


class Affine(L.Layer):
    """``x * w + b`` with the width in its config (ResMLP's Affine)."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim = dim

    def build(self, shape: Any) -> None:
        self.alpha = self.add_weight(shape=(self.dim,), initializer="ones")
        self.beta = self.add_weight(shape=(self.dim,), initializer="zeros")

    def call(self, x: Any) -> Any:
        return x * self.alpha + self.beta

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "dim": self.dim}


class Bias(L.Layer):
    """``x + b``, its width taken from the input when built."""

    def build(self, shape: Any) -> None:
        self.b = self.add_weight(shape=(shape[-1],), initializer="zeros")

    def call(self, x: Any) -> Any:
        return x + self.b


class Gain(L.Layer):
    """``x * g``, one gain per channel, no config entry for the width."""

    def build(self, shape: Any) -> None:
        self.g = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x: Any) -> Any:
        return x * self.g


class ScalarGain(L.Layer):
    """``x * g`` with one gain for every channel (NFNet's skip gain)."""

    def build(self, shape: Any) -> None:
        self.g = self.add_weight(shape=(1,), initializer="ones")

    def call(self, x: Any) -> Any:
        return x * self.g


class GRN(L.Layer):
    """ConvNeXt-V2 global response normalisation: a statistic over the channels."""

    def build(self, shape: Any) -> None:
        self.gamma = self.add_weight(shape=(shape[-1],), initializer="zeros")
        self.beta = self.add_weight(shape=(shape[-1],), initializer="zeros")

    def call(self, x: Any) -> Any:
        gx = ops.norm(x, axis=(1, 2), keepdims=True)
        nx = gx / (ops.mean(gx, axis=-1, keepdims=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class RMSScale(L.Layer):
    """RMS normalisation over the channels with a per-channel scale (T5/Gemma style)."""

    def build(self, shape: Any) -> None:
        self.scale = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x: Any) -> Any:
        return x * ops.rsqrt(ops.mean(x**2, axis=-1, keepdims=True) + 1e-6) * self.scale


class WSConv2D(L.Conv2D):
    """A Conv2D with standardised weights (NFNet, BiT): each filter's statistics."""

    def convolution_op(self, inputs: Any, kernel: Any) -> Any:
        mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
        var = ops.var(kernel, axis=(0, 1, 2), keepdims=True)
        return super().convolution_op(inputs, (kernel - mean) / ops.sqrt(var + 1e-5))


class PlainConv2D(L.Conv2D):
    """A Conv2D subclass that computes exactly what Conv2D does."""

    def call(self, inputs: Any) -> Any:
        return super().call(inputs)


CUSTOM_OBJECTS = {
    c.__name__: c for c in (Affine, Bias, Gain, ScalarGain, GRN, RMSScale, WSConv2D, PlainConv2D)
}

# -- image blocks: conv stem -> block -> conv -> head ----------------------------

IMAGE = (6, 6, 3)


def image_model(body: Callable[[Any], Any], name: str) -> keras.Model:
    inp = keras.Input(IMAGE)
    x = L.Conv2D(8, 1, name="stem")(inp)
    x = L.Conv2D(8, 1, name="after")(body(x))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, name="head")(x), name=name)


def _pw(x: Any, n: int = 16) -> Any:
    return L.Conv2D(n, 1, name="pw")(x)


def _grn_ops(x: Any) -> Any:
    x = _pw(x)
    gx = ops.norm(x, axis=(1, 2), keepdims=True)
    return x * (gx / (ops.mean(gx, axis=-1, keepdims=True) + 1e-6)) + x


def _rms_ops(x: Any) -> Any:
    x = _pw(x)
    return x * ops.rsqrt(ops.mean(x**2, axis=-1, keepdims=True) + 1e-6)


def _l2_ops(x: Any) -> Any:
    x = _pw(x)
    return x / ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True) + 1e-6)


def _ws_convs(x: Any) -> Any:
    x = WSConv2D(16, 3, padding="same", name="ws1")(x)
    return WSConv2D(16, 3, padding="same", name="ws2")(L.ReLU()(x))


def _grouped_per_output(x: Any) -> Any:
    # groups == filters but two inputs per group: not a depthwise conv.
    return L.Conv2D(16, 3, groups=16, padding="same", name="grouped")(_pw(x, 32))


def _heads_reshape(x: Any) -> Any:
    # (H, W, 32) -> (H, W, 4, 8): the split of the channels depends on the width.
    y = ops.reshape(_pw(x, 32), (-1, IMAGE[0], IMAGE[1], 4, 8))
    return ops.reshape(ops.max(y, axis=-1), (-1, IMAGE[0], IMAGE[1], 4))


def _flat_reshape(x: Any) -> Any:
    # (6, 6, 16) -> (36 * 16 / 96, 96): rows of the flattened map, not channels.
    y = L.Reshape((6, 96))(_pw(x))
    return L.Reshape((*IMAGE[:2], 16))(L.Dense(96, name="rows")(y))


IMAGE_BLOCKS: dict[str, Callable[[Any], Any]] = {
    "grn_ops": _grn_ops,
    "rms_ops": _rms_ops,
    "l2_ops": _l2_ops,
    "grn_layer": lambda x: GRN()(_pw(x)),
    "rms_layer": lambda x: RMSScale()(_pw(x)),
    "layer_norm": lambda x: L.LayerNormalization(name="ln")(_pw(x)),
    "affine": lambda x: Affine(16)(_pw(x)),
    "bias": lambda x: Bias()(_pw(x)),
    "gain": lambda x: Gain()(_pw(x)),
    "scalar_gain": lambda x: ScalarGain()(_pw(x)),
    "ws_conv": _ws_convs,
    "plain_conv_subclass": lambda x: PlainConv2D(16, 3, padding="same", name="sub")(x),
    "grouped_per_output": _grouped_per_output,
    "heads_reshape": _heads_reshape,
    "flat_reshape": _flat_reshape,
}

# -- token blocks: Dense embed -> x + proj(block(x)) -> head -----------------------

N, C, H = 16, 16, 4
D = C // H
TOKENS = (N, 5)


def token_model(body: Callable[[Any], Any], name: str) -> keras.Model:
    inp = keras.Input(TOKENS)
    x = L.Dense(C, name="embed")(inp)
    x = L.Add(name="residual")([x, L.Dense(C, name="proj")(body(x))])
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inp, L.Dense(3, name="head")(x), name=name)


def _split_heads(t: Any, n: int = N) -> Any:  # (B, n, C) -> (B, H, n, D)
    return ops.transpose(ops.reshape(t, (-1, n, H, D)), (0, 2, 1, 3))


def _attend(q: Any, k: Any, v: Any) -> Any:
    a = ops.softmax(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * D**-0.5, axis=-1)
    return ops.reshape(ops.transpose(ops.matmul(a, v), (0, 2, 1, 3)), (-1, N, C))


def _kv_strided(y: Any) -> Any:
    """PVT spatial reduction: kv from a strided conv of the tokens, one kv Dense split in two."""
    q = L.Dense(C, name="q")(y)
    s = L.Conv2D(C, 2, strides=2, name="sr")(L.Reshape((4, 4, C))(y))
    k, v = ops.split(L.Dense(2 * C, name="kv")(L.Reshape((4, C))(s)), 2, axis=-1)
    return _attend(_split_heads(q), _split_heads(k, 4), _split_heads(v, 4))


def _kv_pooled(y: Any) -> Any:
    """Separate q, k and v projections; k and v read a pooled input."""
    s = L.AveragePooling1D(4)(y)
    q, k, v = L.Dense(C, name="q")(y), L.Dense(C, name="k")(s), L.Dense(C, name="v")(s)
    return _attend(_split_heads(q), _split_heads(k, 4), _split_heads(v, 4))


def _kv_stacked(y: Any) -> Any:
    """kv reshaped to (N, 2, H, D), transposed and indexed (PVTv2)."""
    q, kv = L.Dense(C, name="q")(y), L.Dense(2 * C, name="kv")(y)
    kv = ops.transpose(ops.reshape(kv, (-1, N, 2, H, D)), (2, 0, 3, 1, 4))
    return _attend(_split_heads(q), kv[0], kv[1])


def _channel_attention(y: Any) -> Any:
    """XCiT cross-covariance attention: a (D, D) map per head, over channels."""
    q, k, v = (L.Dense(C, name=n)(y) for n in "qkv")

    def th(t: Any) -> Any:  # (B, N, C) -> (B, H, D, N)
        return ops.transpose(ops.reshape(t, (-1, N, H, D)), (0, 2, 3, 1))

    a = ops.softmax(ops.matmul(th(q), ops.transpose(th(k), (0, 1, 3, 2))), axis=-1)
    return ops.reshape(ops.transpose(ops.matmul(a, th(v)), (0, 3, 1, 2)), (-1, N, C))


def _permute_heads(y: Any) -> Any:
    """Heads made by a Reshape layer and Permute((2, 1, 3)) instead of ops."""
    q, k, v = (L.Permute((2, 1, 3))(L.Reshape((N, H, D))(L.Dense(C, name=n)(y))) for n in "qkv")
    a = ops.softmax(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * D**-0.5, axis=-1)
    return L.Reshape((N, C))(L.Permute((2, 1, 3))(ops.matmul(a, v)))


def _token_mixing(y: Any) -> Any:
    """MLP-Mixer: Permute channels and tokens, an MLP over tokens, Permute back."""
    t = L.Dense(32, activation="gelu", name="tok1")(L.Permute((2, 1))(y))
    return L.Permute((2, 1))(L.Dense(N, name="tok2")(t))


def _token_mixing_ops(y: Any) -> Any:
    t = L.Dense(32, activation="gelu", name="tok1")(ops.transpose(y, (0, 2, 1)))
    return ops.transpose(L.Dense(N, name="tok2")(t), (0, 2, 1))


def _mha_kv_pooled(y: Any) -> Any:
    s = L.Dense(12, name="kv_in")(L.AveragePooling1D(4)(y))
    return L.MultiHeadAttention(H, D, name="mha")(y, s)


def _mha_separate_key(y: Any) -> Any:
    k = L.Dense(12, name="k_in")(y)
    return L.MultiHeadAttention(H, D, value_dim=6, name="mha")(y, y, k)


def _gqa(y: Any) -> Any:
    return L.GroupQueryAttention(D, 4, 2, name="gqa")(y, y)


TOKEN_BLOCKS: dict[str, Callable[[Any], Any]] = {
    "kv_strided": _kv_strided,
    "kv_pooled": _kv_pooled,
    "kv_stacked": _kv_stacked,
    "channel_attention": _channel_attention,
    "permute_heads": _permute_heads,
    "token_mixing": _token_mixing,
    "token_mixing_ops": _token_mixing_ops,
    "mha_kv_pooled": _mha_kv_pooled,
    "mha_separate_key": _mha_separate_key,
    "gqa": _gqa,
}


def block_model(name: str) -> tuple[keras.Model, tuple[int, ...]]:
    """The model of one block by name, and its input shape (without batch)."""
    if name in IMAGE_BLOCKS:
        return image_model(IMAGE_BLOCKS[name], name), IMAGE
    return token_model(TOKEN_BLOCKS[name], name), TOKENS


def randomize_every_weight(model: keras.Model, seed: int = 0) -> None:
    """Every weight random, BatchNorm variances positive, so a wrong slice shows."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False):
        if layer._layers:
            continue  # a block or attention layer: its sub-layers get their own
        values = []
        for w in layer.weights:
            if "variance" in w.name:
                values.append(rng.uniform(0.5, 2.0, w.shape).astype("float32"))
            else:
                values.append(rng.normal(0, 0.4, w.shape).astype(w.dtype))
        if values:
            layer.set_weights(values)
