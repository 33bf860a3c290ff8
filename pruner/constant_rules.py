"""Propagation rules of :mod:`secateur.pruner.constants`, by exact layer class.

A rule maps the states of a call's inputs to the states of its outputs, or
returns None when it cannot: the outputs become unknown and exact non-zero
constants reaching the layer are recorded as lost. Conv and Dense also
record what they read, for bias folding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from secateur.pruner._keras import keras
from secateur.pruner.constants import (
    Ctx,
    Feed,
    State,
    activation,
    affine,
    channels,
    elementwise,
    register_rule,
)
from secateur.pruner.handlers import Unsupported
from secateur.pruner.handlers_layers import einsum_axes

L = keras.layers


# -- producers and consumers -------------------------------------------------


def _finish(ctx: Ctx, st: State) -> list[State]:
    """Apply the layer's own activation; a channel-mixing one loses track."""
    out = activation(ctx.layer, st)
    return [out if out is not None else State.unknown(len(st.mean))]


def _zero_filters(ctx: Ctx, kernel: np.ndarray, out_axis: int) -> State:
    """Output channels whose whole filter is zero output their bias."""
    dead = dead_filters(kernel, out_axis)
    bias = ctx.value("bias")
    return State.exact(bias if bias is not None else np.zeros(len(dead)), dead)


def dead_filters(kernel: np.ndarray, out_axis: int) -> np.ndarray:
    """Which output channels of ``kernel`` have an all-zero filter.

    Only filters whose first entry is zero are scanned in full: in trained or
    initialised weights that is almost none, so a model's kernels are not
    each compared element by element on every plan.
    """
    flat = np.moveaxis(kernel, out_axis, -1).reshape(-1, kernel.shape[out_axis])
    if not len(flat):
        return np.ones(flat.shape[1], dtype=bool)
    dead = flat[0] == 0
    if dead.any():
        maybe = np.flatnonzero(dead)
        dead[maybe] = ~np.any(flat[:, maybe] != 0, axis=0)
    return dead


def _tap_dim(
    padding: str, n_in: int | None, n_out: int | None, k: int, stride: int, dil: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per tap of one spatial dim: share of outputs reading inside, and 'always'."""
    if padding == "valid":
        return np.ones(k), np.ones(k, dtype=bool)
    if n_in is None or n_out is None:
        return np.ones(k), np.full(k, k == 1)
    if padding == "causal":
        before = (k - 1) * dil
    else:  # "same", as TensorFlow pads: the smaller half before
        before = max((n_out - 1) * stride + (k - 1) * dil + 1 - n_in, 0) // 2
    idx = np.arange(n_out)[:, None] * stride - before + np.arange(k)[None, :] * dil
    inside = (idx >= 0) & (idx < n_in)
    return np.asarray(inside.mean(axis=0)), np.asarray(inside.all(axis=0))


def _feed(ctx: Ctx, kernel: np.ndarray) -> None:
    """Record a Conv/Dense call reading known values, for bias folding."""
    if not ctx.x.known.any():
        return
    layout = ctx.graph.tensor_layouts.get(id(ctx.node.input_tensors[0]))
    if layout is None:
        return
    taps, always = np.ones(()), np.ones((), dtype=bool)
    layer = ctx.layer
    in_sp, out_sp = ctx.shape()[1:-1], ctx.shape(out=True)[1:-1]
    for d, k in enumerate(kernel.shape[:-2]):
        frac, inside = _tap_dim(
            layer.padding, in_sp[d], out_sp[d], k, layer.strides[d], layer.dilation_rate[d]
        )
        taps = np.multiply.outer(taps, frac)
        always = np.logical_and.outer(always, inside)
    ctx.trace.feeds.append(Feed(ctx.path, layout, ctx.x, taps, ~always))


@register_rule(L.Conv1D, L.Conv2D, L.Conv3D)
def _conv(ctx: Ctx) -> list[State] | None:
    kernel = ctx.array("kernel")
    groups = int(ctx.layer.groups)
    if groups != 1:
        if groups != kernel.shape[-1] or kernel.shape[-2] != 1:
            return None  # not one input per filter: see constant_rules_ops
        # Depthwise written as a grouped conv: (k.., 1, C) is (k.., C, 1).
        return _depthwise(ctx, kernel.reshape(*kernel.shape[:-2], groups, 1))
    _feed(ctx, kernel)
    return _finish(ctx, _zero_filters(ctx, kernel, -1))


@register_rule(L.Dense)
def _dense(ctx: Ctx) -> list[State] | None:
    kernel = ctx.array("kernel")
    _feed(ctx, kernel)
    return _finish(ctx, _zero_filters(ctx, kernel, -1))


@register_rule(L.EinsumDense)
def _einsum_dense(ctx: Ctx) -> list[State] | None:
    try:
        _, out_axis = einsum_axes(ctx.layer.equation)
    except Unsupported:
        return None
    ctx.lose(0, ctx.x.live_constant)  # no bias folding through an einsum yet
    bias = ctx.value("bias")
    if bias is not None and bias.size != bias.shape[-1]:
        return None  # a bias over other axes too is no per-channel constant
    kernel = np.moveaxis(ctx.array("kernel"), out_axis, -1)
    dead = dead_filters(kernel, -1)
    values = bias.reshape(-1) if bias is not None else np.zeros(len(dead))
    return _finish(ctx, State.exact(values, dead))


@register_rule(L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
def _conv_transpose(ctx: Ctx) -> list[State] | None:
    ctx.lose(0, ctx.x.live_constant)  # no bias folding through a transpose yet
    kernel = ctx.array("kernel")
    return _finish(ctx, _zero_filters(ctx, kernel, -2))


@register_rule(L.SeparableConv1D, L.SeparableConv2D)
def _separable(ctx: Ctx) -> list[State] | None:
    ctx.lose(0, ctx.x.live_constant)  # its depthwise half pads per channel
    kernel = ctx.array("pointwise_kernel")
    return _finish(ctx, _zero_filters(ctx, kernel, -1))


@register_rule(L.DepthwiseConv1D, L.DepthwiseConv2D)
def _depthwise_layer(ctx: Ctx) -> list[State] | None:
    kernel = ctx.array("kernel")
    return _depthwise(ctx, kernel)


def _depthwise(ctx: Ctx, kernel: np.ndarray) -> list[State]:
    """Per-channel filters (k.., C, multiplier): output i*m+j reads input i."""
    c, dm = kernel.shape[-2:]
    flat = kernel.reshape(-1, c, dm)
    dead = ~np.any(flat != 0, axis=0)
    total = flat.sum(axis=0)
    bias = ctx.value("bias")
    b = bias.reshape(c, dm) if bias is not None else np.zeros((c, dm))
    x = ctx.x
    # A constant reaches every output alike only without zero padding; a
    # zero input or a dead filter gives the bias whatever the padding.
    uniform = ctx.layer.padding == "valid" or flat.shape[0] == 1
    fixed = dead | (x.is_exact & (x.mean == 0))[:, None]
    mean = np.where(fixed, b, x.mean[:, None] * total + b)
    std = np.where(fixed, 0.0, x.std[:, None] * np.abs(total))
    known = fixed | (x.known[:, None] & uniform)
    if not uniform:
        ctx.lose(0, x.live_constant & ~dead.all(axis=1))
    return _finish(ctx, State(mean.reshape(-1), std.reshape(-1), known.reshape(-1)))


@register_rule(L.Embedding)
def _embedding(ctx: Ctx) -> list[State] | None:
    return [State.unknown(channels(ctx.node.outputs[0]))]


# -- per-channel layers ------------------------------------------------------


@register_rule(L.BatchNormalization)
def _batchnorm(ctx: Ctx) -> list[State] | None:
    layer, x = ctx.layer, ctx.x
    rank = len(ctx.shape())
    if isinstance(layer.axis, (list, tuple)) or int(layer.axis) % rank != rank - 1:
        return None
    n = len(x.mean)
    gamma = ctx.value("gamma")
    gamma = np.ones(n) if gamma is None else gamma.astype(np.float64)
    beta = ctx.value("beta")
    beta = np.zeros(n) if beta is None else beta.astype(np.float64)
    mm, mv = ctx.array("moving_mean"), ctx.array("moving_variance")
    scale = gamma / np.sqrt(mv.astype(np.float64) + float(layer.epsilon))
    out = affine(x, scale, beta - scale * mm)
    # At inference the normalised input is about N(0, 1): an unknown channel
    # is about N(beta, gamma^2), exactly beta when gamma is 0.
    out.mean = np.where(x.known, out.mean, beta)
    out.std = np.where(x.known, out.std, np.abs(gamma))
    out.known = np.ones(n, dtype=bool)
    return [out]


@register_rule(L.Activation)
def _activation_layer(ctx: Ctx) -> list[State] | None:
    out = activation(ctx.layer, ctx.x)
    return None if out is None else [out]


@register_rule(L.ReLU, L.LeakyReLU, L.ELU)
def _activation_function(ctx: Ctx) -> list[State] | None:
    return [elementwise(ctx.layer, ctx.x)]


@register_rule(L.Rescaling)
def _rescaling(ctx: Ctx) -> list[State] | None:
    scale, offset = ctx.layer.scale, ctx.layer.offset
    if np.size(scale) != 1 or np.size(offset) != 1:
        return None
    return [affine(ctx.x, float(np.ravel(scale)[0]), float(np.ravel(offset)[0]))]


def _same(ctx: Ctx) -> list[State] | None:
    """Layers that move or drop positions but never mix or change values."""
    if any(channels(t) != len(ctx.x.mean) for t in ctx.node.outputs):
        return None
    return [ctx.x for _ in ctx.node.outputs]


register_rule(
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Identity,
    L.MaxPooling1D,
    L.MaxPooling2D,
    L.MaxPooling3D,
    L.AveragePooling1D,
    L.AveragePooling2D,
    L.AveragePooling3D,
    L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D,
    L.GlobalMaxPooling3D,
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.UpSampling3D,
    L.RepeatVector,
    L.Resizing,
    L.CenterCrop,
    L.RandomFlip,
    L.RandomRotation,
    L.RandomZoom,
    L.RandomTranslation,
    L.RandomCrop,
    L.Permute,
)(_same)


@register_rule(L.Flatten, L.Reshape)
def _flatten(ctx: Ctx) -> list[State] | None:
    x, n = ctx.x, channels(ctx.node.outputs[0])
    if n == len(x.mean):
        return [x]
    if len(ctx.shape(out=True)) != 2 or n % len(x.mean):
        return None
    reps = n // len(x.mean)  # (H, W, C) -> H*W*C: position-major, channel-minor
    return [State(np.tile(x.mean, reps), np.tile(x.std, reps), np.tile(x.known, reps))]


@register_rule(L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D)
def _zero_padding(ctx: Ctx) -> list[State] | None:
    x = ctx.x
    ctx.lose(0, x.live_constant)  # a padded constant is no longer uniform
    return [State(x.mean, x.std, x.known & ~x.live_constant)]


@register_rule(L.Concatenate)
def _concatenate(ctx: Ctx) -> list[State] | None:
    if int(ctx.layer.axis) % len(ctx.shape(out=True)) != len(ctx.shape(out=True)) - 1:
        return None
    return [State(*(np.concatenate([getattr(s, f) for s in ctx.ins]) for f in _FIELDS))]


_FIELDS = ("mean", "std", "known")


# Merge layers of tensors only, computed in numpy: calling the Keras layer on
# the means costs more than the rest of the walk (ResNet50 has 16 Adds).
_MERGES: dict[type, Callable[[np.ndarray], np.ndarray]] = {
    L.Add: lambda v: v.sum(axis=0),
    L.Subtract: lambda v: v[0] - v[1],
    L.Multiply: lambda v: v.prod(axis=0),
    L.Average: lambda v: v.mean(axis=0),
    L.Maximum: lambda v: v.max(axis=0),
    L.Minimum: lambda v: v.min(axis=0),
}


def _merge(ctx: Ctx) -> list[State] | None:
    """Elementwise ops of tensors and scalars, evaluated on the known means."""
    n = channels(ctx.node.outputs[0])
    if any(len(s.mean) not in (1, n) for s in ctx.ins):
        return None
    op = _MERGES.get(type(ctx.layer))
    if op is not None:
        result = op(np.stack([np.broadcast_to(s.mean, (n,)) for s in ctx.ins]))
    else:
        result = _call_on_means(ctx)
    if result.size not in (1, n):
        return None  # a constant operand of more than one channel broadcast the result
    mean = np.broadcast_to(result.reshape(-1), (n,))
    known = np.logical_and.reduce([np.broadcast_to(s.known, (n,)) for s in ctx.ins])
    var = np.add.reduce([np.broadcast_to(np.square(s.std), (n,)) for s in ctx.ins])
    known = known & np.isfinite(mean)
    return [State(np.where(known, mean, 0.0), np.sqrt(var), known)]


def _call_on_means(ctx: Ctx) -> np.ndarray:
    """The call's own op (scalars included) applied to its inputs' means."""
    values = {
        id(t): keras.ops.convert_to_tensor(s.mean[None, :].astype("float32"))
        for t, s in zip(ctx.node.input_tensors, ctx.ins)
    }
    args, kwargs = ctx.node.arguments.fill_in(values)
    return np.asarray(keras.ops.convert_to_numpy(ctx.layer(*args, **kwargs)), np.float64)


register_rule(*_MERGES)(_merge)


def _register_optional() -> None:
    """keras.ops arithmetic and keras.applications layers in private modules."""
    try:
        from keras.src.ops import numpy as knp

        register_rule(knp.Add, knp.Subtract, knp.Multiply, knp.Divide, knp.TrueDivide)(_merge)
    except (ImportError, AttributeError):  # pragma: no cover - Keras internals moved
        pass
    try:
        from keras.src.applications.convnext import LayerScale, StochasticDepth

        register_rule(StochasticDepth)(_same)

        @register_rule(LayerScale)
        def _layer_scale(ctx: Ctx) -> list[State] | None:
            gamma = ctx.value("gamma")
            return None if gamma is None else [affine(ctx.x, gamma.astype(np.float64), 0.0)]

    except ImportError:  # pragma: no cover
        pass


_register_optional()
