"""Constant-propagation rules for the keras.ops nodes of :mod:`handlers_ops`.

Each op the tracer passes channels through also carries the per-channel
:class:`~secateur.pruner.constants.State` of its input, so a removed
channel's constant (``sigmoid(0) = 0.5``, ``exp(0) = 1``) still reaches the
bias it is folded into: channel-wise ops are evaluated on the states, ops
that move or reduce other axes keep them (``sum`` scales them), ``split``,
channel slices and ``concatenate`` cut and join them. Padding with a value
other than the constant makes it non-uniform: it is recorded as lost, so
the channel is kept live rather than dropped inexactly.

Registered when :mod:`secateur.pruner.constant_tracing` imports this module.
"""

from __future__ import annotations

import itertools

import numpy as np

from secateur.pruner._keras import keras
from secateur.pruner.constant_rules import _conv, _finish, _merge, _same, _zero_filters
from secateur.pruner.constants import Ctx, State, affine, channels, elementwise, register_rule
from secateur.pruner.handlers import Unsupported
from secateur.pruner.handlers_ops import UNARY, normalised_key, op_classes

_FIELDS = ("mean", "std", "known")


def _cut(st: State, start: int, stop: int) -> State:
    return State(st.mean[start:stop], st.std[start:stop], st.known[start:stop])


def _channel_axis(ctx: Ctx, axis: int) -> bool:
    rank = len(ctx.shape())
    return int(axis) % rank == rank - 1


def _unary(ctx: Ctx) -> list[State] | None:
    if type(ctx.layer).__name__ == "Cast" and not keras.backend.is_float_dtype(ctx.layer.dtype):
        return None
    return [elementwise(ctx.layer, ctx.x)]


def _split(ctx: Ctx) -> list[State] | None:
    if not _channel_axis(ctx, ctx.layer.axis):
        return [ctx.x for _ in ctx.node.outputs]
    edges = np.cumsum([0, *(channels(t) for t in ctx.node.outputs)])
    return [_cut(ctx.x, int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _get_item(ctx: Ctx) -> list[State] | None:
    try:
        last = normalised_key(ctx.node.arguments.args[1], len(ctx.shape()))[-1]
    except Unsupported:
        return None
    if not isinstance(last, slice) or isinstance(last.start, keras.KerasTensor):
        return None
    start, stop, step = last.indices(len(ctx.x.mean))
    if step != 1 or channels(ctx.node.outputs[0]) != stop - start:
        return None
    return [_cut(ctx.x, start, stop)]


def _concatenate(ctx: Ctx) -> list[State] | None:
    if _channel_axis(ctx, ctx.layer.axis):
        return [State(*(np.concatenate([getattr(s, f) for s in ctx.ins]) for f in _FIELDS))]
    # Joined along another axis: a channel is known where every input agrees.
    first = ctx.ins[0]
    agree = np.logical_and.reduce(
        [s.known & (s.mean == first.mean) & (s.std == first.std) for s in ctx.ins]
    )
    return [State(np.where(agree, first.mean, 0.0), first.std, agree)]


def _sum(ctx: Ctx) -> list[State] | None:
    shape = ctx.shape()
    if ctx.layer.axis is None:
        return None
    axes = {int(a) % len(shape) for a in np.atleast_1d(ctx.layer.axis)}
    dims = [shape[a] for a in axes]
    if len(shape) - 1 in axes or None in dims:
        return None
    return [affine(ctx.x, float(np.prod(dims)), 0.0)]


def _padded(ctx: Ctx, value: float) -> list[State]:
    """Borders of ``value``: an exact constant of another value is no longer uniform."""
    x = ctx.x
    broken = x.is_exact & (x.mean != value)
    ctx.lose(0, broken)
    return [State(x.mean, x.std, x.known & ~broken)]


def _pad(ctx: Ctx) -> list[State] | None:
    if ctx.layer.mode != "constant":
        return [ctx.x]  # reflect/symmetric/edge repeat the channel's own values
    value = ctx.node.arguments.kwargs.get("constant_values")
    return _padded(ctx, float(value or 0.0))


def _resize(ctx: Ctx) -> list[State] | None:
    if ctx.layer.pad_to_aspect_ratio:
        return _padded(ctx, float(ctx.layer.fill_value or 0.0))
    return [ctx.x]  # interpolation weights add up to one


@register_rule(keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
def _grouped_conv(ctx: Ctx) -> list[State] | None:
    """A grouped conv's dead filters output their bias, like a plain conv's."""
    kernel = ctx.array("kernel")
    groups = int(ctx.layer.groups)
    if groups == 1 or (groups == kernel.shape[-1] and kernel.shape[-2] == 1):
        return _conv(ctx)  # plain, or depthwise written as a grouped conv
    ctx.lose(0, ctx.x.live_constant)  # a grouped kernel is not folded into yet
    return _finish(ctx, _zero_filters(ctx, kernel, -1))


@register_rule(keras.layers.GroupNormalization)
def _group_norm(ctx: Ctx) -> list[State] | None:
    """A group whose channels are all exact constants normalises to exact constants."""
    layer, x = ctx.layer, ctx.x
    n = len(x.mean)
    if not _channel_axis(ctx, layer.axis):
        return None
    groups = n if int(layer.groups) == -1 else int(layer.groups)
    exact = np.repeat(x.is_exact.reshape(groups, -1).all(axis=1), n // groups)
    ctx.lose(0, x.live_constant & ~exact)
    m = x.mean.reshape(groups, -1)
    centred = m - m.mean(axis=1, keepdims=True)
    var = np.mean(np.square(centred), axis=1, keepdims=True)
    gamma, beta = ctx.value("gamma"), ctx.value("beta")
    out = (centred / np.sqrt(var + float(layer.epsilon))).reshape(-1)
    out = out * (1.0 if gamma is None else gamma) + (0.0 if beta is None else beta)
    return [State.exact(out, exact)]


_RULES = {
    "numpy.Split": _split,
    "numpy.GetItem": _get_item,
    "numpy.Concatenate": _concatenate,
    "numpy.Mean": _same,
    "numpy.Max": _same,
    "numpy.Min": _same,
    "numpy.Amax": _same,
    "numpy.Amin": _same,
    "numpy.Sum": _sum,
    "numpy.Pad": _pad,
    "image.Resize": _resize,
    # A pooling window of one constant holds that constant (TensorFlow's
    # average pooling leaves padding out of the mean).
    "nn.MaxPool": _same,
    "nn.AveragePool": _same,
    "numpy.ExpandDims": _same,
    "numpy.Squeeze": _same,
    "numpy.Maximum": _merge,
    "numpy.Power": _merge,
    "numpy.Reshape": _same,
    "numpy.Transpose": _same,
    "numpy.Minimum": _merge,
}


def _register() -> None:
    register_rule(*op_classes(*UNARY))(_unary)
    for name, rule in _RULES.items():
        register_rule(*op_classes(name))(rule)


_register()
