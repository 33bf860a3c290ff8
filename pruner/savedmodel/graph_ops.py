"""The op table of the graph importer: one TensorFlow op -> built-in Keras layers.

Each converter reads its node's inputs through a :class:`Context` (Keras
tensors for values that depend on the signature's inputs, numpy arrays for
folded constants, :class:`~.graph_fold.Sym` for shapes that follow the batch
size) and returns the node's outputs. Layers the channel tracer handles are
preferred (Conv2D, DepthwiseConv2D, Dense, BatchNormalization, merges ...);
``keras.ops`` calls cover what no layer expresses. Weights are set from the
folded constants, so the new layer computes what the op computed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from secateur.pruner._keras import keras
from secateur.pruner.savedmodel.graph_fold import BATCH_STANDINS, Sym, attr_list, np_dtype
from secateur.pruner.savedmodel.graph_inline import Node, unsupported

L = keras.layers
ops = keras.ops


class Context(Protocol):
    """What a converter may ask about its node's inputs."""

    def tensor(self, node: Node, i: int) -> Any: ...  # a Keras tensor

    def const(self, node: Node, i: int) -> np.ndarray: ...  # a folded constant

    def value(self, node: Node, i: int) -> Any: ...  # either, or a Sym

    def name(self, node: Node) -> str: ...  # a unique layer name for the node


Converter = Callable[[Context, Node], list[Any]]


def is_tensor(value: Any) -> bool:
    return isinstance(value, keras.KerasTensor)


def _build(layer: Any, x: Any, weights: list[np.ndarray]) -> Any:
    y = layer(x)
    layer.set_weights([np.asarray(w, dtype=v.dtype) for w, v in zip(weights, layer.weights)])
    return y


def _text(node: Node, key: str, default: str = "") -> str:
    return node.attr[key].s.decode() if key in node.attr else default


def _spatial(node: Node, key: str) -> tuple[int, int]:
    values = attr_list(node.attr, key) or [1, 1, 1, 1]
    if len(values) != 4 or values[0] != 1 or values[3] != 1:
        raise unsupported(node.name, node.op, f"{key}={values} over batch or channels")
    return values[1], values[2]


def _padded(ctx: Context, node: Node, x: Any) -> tuple[Any, str]:
    """The input and Keras padding mode of a convolution or pooling op (NHWC only)."""
    if _text(node, "data_format", "NHWC") != "NHWC":
        raise unsupported(node.name, node.op, "only NHWC data is imported")
    padding = node.fields.get("padding") or _text(node, "padding")
    if padding in ("SAME", "VALID"):
        return x, padding.lower()
    if padding != "EXPLICIT":
        raise unsupported(node.name, node.op, f"padding {padding!r}")
    p = attr_list(node.attr, "explicit_paddings")
    if len(p) != 8 or any(p[i] for i in (0, 1, 6, 7)):
        raise unsupported(node.name, node.op, f"explicit paddings {p}")
    pad = L.ZeroPadding2D(((p[2], p[3]), (p[4], p[5])), name=ctx.name(node) + "_pad")
    return pad(x), "valid"


def _conv2d(ctx: Context, node: Node) -> list[Any]:
    x, padding = _padded(ctx, node, ctx.tensor(node, 0))
    kernel = ctx.const(node, 1)
    kh, kw, cin, cout = kernel.shape
    channels = x.shape[-1]
    if channels is None or channels % cin or cout % (channels // cin):
        raise unsupported(node.name, node.op, f"kernel {kernel.shape} on {channels} channels")
    bias = node.fields.get("bias")
    layer = L.Conv2D(
        cout,
        (kh, kw),
        strides=_spatial(node, "strides"),
        padding=padding,
        dilation_rate=node.fields.get("dilation") or _spatial(node, "dilations"),
        groups=channels // cin,
        use_bias=bias is not None,
        name=ctx.name(node),
    )
    return [_build(layer, x, [kernel] if bias is None else [kernel, bias])]


def _depthwise(ctx: Context, node: Node) -> list[Any]:
    x, padding = _padded(ctx, node, ctx.tensor(node, 0))
    kernel = ctx.const(node, 1)
    kh, kw, _, multiplier = kernel.shape
    bias = node.fields.get("bias")
    layer = L.DepthwiseConv2D(
        (kh, kw),
        strides=_spatial(node, "strides"),
        padding=padding,
        depth_multiplier=multiplier,
        dilation_rate=node.fields.get("dilation") or _spatial(node, "dilations"),
        use_bias=bias is not None,
        name=ctx.name(node),
    )
    return [_build(layer, x, [kernel] if bias is None else [kernel, bias])]


def _matmul(ctx: Context, node: Node) -> list[Any]:
    """MatMul / BatchMatMul of a tensor by a constant matrix -> Dense."""
    a, b = ctx.value(node, 0), ctx.value(node, 1)
    flags = [bool(node.attr[k].b) for k in ("transpose_a", "adj_x") if k in node.attr]
    t_b = any(bool(node.attr[k].b) for k in ("transpose_b", "adj_y") if k in node.attr)
    if is_tensor(a) and is_tensor(b):
        if any(flags) or t_b:
            raise unsupported(node.name, node.op, "transposed operands of two tensors")
        return [ops.matmul(a, b)]
    if not is_tensor(a) or any(flags) or np.ndim(b) != 2:
        raise unsupported(node.name, node.op, "a constant left operand or a batched kernel")
    kernel = b.T if t_b else b
    bias = node.fields.get("bias")
    layer = L.Dense(kernel.shape[1], use_bias=bias is not None, name=ctx.name(node))
    return [_build(layer, a, [kernel] if bias is None else [kernel, bias])]


def _fused_bn(ctx: Context, node: Node) -> list[Any]:
    if "is_training" in node.attr and node.attr["is_training"].b:
        raise unsupported(node.name, node.op, "batch statistics (is_training=True)")
    if _text(node, "data_format", "NHWC") not in ("NHWC", "NDHWC"):
        raise unsupported(node.name, node.op, "only channels-last data is imported")
    x = ctx.tensor(node, 0)
    gamma, beta, mean, var = (ctx.const(node, i) for i in range(1, 5))
    eps = float(node.attr["epsilon"].f) if "epsilon" in node.attr else 1e-3
    layer = L.BatchNormalization(epsilon=eps, name=ctx.name(node))
    return [_build(layer, x, [gamma, beta, mean, var])] + [None] * 5


def affine_layer(ctx: Context, node: Node, x: Any, scale: Any, offset: Any) -> Any:
    """``x * scale + offset``: Rescaling for scalars, a frozen BatchNormalization per channel.

    A frozen BatchNormalization (mean 0, variance 1, epsilon 0, not trainable)
    computes exactly ``x * gamma + beta`` in training and inference, and the
    channel tracer prunes it with its producer. Any other broadcast falls back
    to ``keras.ops`` arithmetic with the constants.
    """
    scale, offset = np.asarray(scale), np.asarray(offset)
    rank, channels = len(x.shape), x.shape[-1]
    if scale.size == 1 and offset.size == 1 and max(scale.ndim, offset.ndim) <= rank:
        layer = L.Rescaling(float(scale.ravel()[0]), float(offset.ravel()[0]), name=ctx.name(node))
        return layer(x)
    if _per_channel(scale, rank, channels) and _per_channel(offset, rank, channels):
        ones = np.ones(channels, dtype="float32")
        gamma, beta = scale.ravel() * ones, offset.ravel() * ones
        bn = L.BatchNormalization(epsilon=0.0, trainable=False, name=ctx.name(node))
        return _build(bn, x, [gamma, beta, np.zeros_like(ones), ones])
    y = x if scale.size == 1 and scale.ravel()[0] == 1 else ops.multiply(x, scale)
    return y if offset.size == 1 and offset.ravel()[0] == 0 else ops.add(y, offset)


def _per_channel(c: np.ndarray, rank: int, channels: int | None) -> bool:
    return (
        channels is not None
        and c.ndim <= rank
        and all(d == 1 for d in c.shape[:-1])
        and (c.size == 1 or c.shape[-1] == channels)
    )


_MERGES: dict[str, Callable[..., Any]] = {
    "Add": L.Add,
    "AddV2": L.Add,
    "BiasAdd": L.Add,
    "Sub": L.Subtract,
    "Mul": L.Multiply,
    "Maximum": L.Maximum,
    "Minimum": L.Minimum,
}
_CONST_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "RealDiv": ops.divide,
    "Maximum": ops.maximum,
    "Minimum": ops.minimum,
    "Add": ops.add,
    "AddV2": ops.add,
    "BiasAdd": ops.add,
    "Sub": ops.subtract,
    "Mul": ops.multiply,
}


def _affine_of(op: str, c: np.ndarray, const_first: bool) -> tuple[Any, Any] | None:
    """(scale, offset) with ``op(x, c) == x * scale + offset``; None where none exist."""
    if op in ("Add", "AddV2", "BiasAdd"):
        return 1.0, c
    if op == "Sub":
        return (-1.0, c) if const_first else (1.0, -c)
    if op == "Mul":
        return c, 0.0
    if op == "RealDiv" and not const_first:
        return (1 / c).astype(c.dtype), 0.0
    return None


def _binary(ctx: Context, node: Node) -> list[Any]:
    a, b = ctx.value(node, 0), ctx.value(node, 1)
    if is_tensor(a) and is_tensor(b):
        if node.op == "RealDiv":
            return [ops.divide(a, b)]
        return [_MERGES[node.op](name=ctx.name(node))([a, b])]
    const_first = not is_tensor(a)
    x, c = (b, np.asarray(a)) if const_first else (a, np.asarray(b))
    if not is_tensor(x):
        raise unsupported(node.name, node.op, "operands that are neither tensors nor constants")
    affine = _affine_of(node.op, c, const_first)
    if affine is not None and c.dtype.kind == "f":
        return [affine_layer(ctx, node, x, *affine)]
    fn = _CONST_OPS[node.op]
    return [fn(c, x) if const_first else fn(x, c)]


def _affine_node(ctx: Context, node: Node) -> list[Any]:
    """An importer-made ``x * scale + offset`` (see graph_patterns)."""
    x = ctx.tensor(node, 0)
    bn = node.fields.get("bn")
    if bn is None:
        return [affine_layer(ctx, node, x, node.fields["scale"], node.fields["offset"])]
    layer = L.BatchNormalization(epsilon=bn["epsilon"], name=ctx.name(node))
    return [_build(layer, x, [bn["gamma"], bn["beta"], bn["mean"], bn["variance"]])]


def _add_n(ctx: Context, node: Node) -> list[Any]:
    xs = [ctx.tensor(node, i) for i in range(len(node.inputs))]
    return [L.Add(name=ctx.name(node))(xs) if len(xs) > 1 else xs[0]]


def _activation(make: Callable[[str], Any]) -> Converter:
    return lambda ctx, node: [make(ctx.name(node))(ctx.tensor(node, 0))]


def _leaky(ctx: Context, node: Node) -> list[Any]:
    alpha = float(node.attr["alpha"].f) if "alpha" in node.attr else 0.2
    return [L.LeakyReLU(negative_slope=alpha, name=ctx.name(node))(ctx.tensor(node, 0))]


def _unary(fn: Callable[[Any], Any]) -> Converter:
    return lambda ctx, node: [fn(ctx.tensor(node, 0))]


def _concat(ctx: Context, node: Node) -> list[Any]:
    axis = int(ctx.const(node, len(node.inputs) - 1))
    xs = [ctx.tensor(node, i) for i in range(len(node.inputs) - 1)]
    return [L.Concatenate(axis=axis, name=ctx.name(node))(xs)]


def _pool(layer_class: Any) -> Converter:
    def convert(ctx: Context, node: Node) -> list[Any]:
        x, padding = _padded(ctx, node, ctx.tensor(node, 0))
        layer = layer_class(
            pool_size=_spatial(node, "ksize"),
            strides=_spatial(node, "strides"),
            padding=padding,
            name=ctx.name(node),
        )
        return [layer(x)]

    return convert


def _reduce(global_layer: Any, fn: Callable[..., Any]) -> Converter:
    """Mean/Max over the two spatial axes of NHWC -> global pooling; else keras.ops."""

    def convert(ctx: Context, node: Node) -> list[Any]:
        x = ctx.tensor(node, 0)
        rank = len(x.shape)
        axes = sorted({int(a) % rank for a in np.ravel(ctx.const(node, 1))})
        keep = bool(node.attr["keep_dims"].b) if "keep_dims" in node.attr else False
        if global_layer is not None and rank == 4 and axes == [1, 2]:
            return [global_layer(keepdims=keep, name=ctx.name(node))(x)]
        return [fn(x, axis=tuple(axes), keepdims=keep)]

    return convert


def _pad(ctx: Context, node: Node) -> list[Any]:
    x, pads = ctx.tensor(node, 0), ctx.const(node, 1).astype(int)
    if node.op == "MirrorPad":
        mode = {"REFLECT": "reflect", "SYMMETRIC": "symmetric"}.get(_text(node, "mode"))
        if mode is None:
            raise unsupported(node.name, node.op, f"mode {_text(node, 'mode')!r}")
        return [ops.pad(x, pads.tolist(), mode=mode)]
    value = float(ctx.const(node, 2)) if node.op == "PadV2" else 0.0
    if len(x.shape) == 4 and value == 0 and not pads[0].any() and not pads[3].any():
        pad = L.ZeroPadding2D((tuple(pads[1]), tuple(pads[2])), name=ctx.name(node))
        return [pad(x)]
    return [ops.pad(x, pads.tolist(), constant_values=value)]


def _reshape(ctx: Context, node: Node) -> list[Any]:
    """A Reshape layer where the batch axis stays; ``keras.ops.reshape`` where it merges."""
    x, shape = ctx.tensor(node, 0), ctx.value(node, 1)
    try:
        dims = shape.dims() if isinstance(shape, Sym) else [int(d) for d in np.ravel(shape)]
    except ValueError as exc:
        raise unsupported(node.name, node.op, f"a target shape that is not static ({exc})") from exc
    full = [-1 if d is None else int(d) for d in dims]
    if not dims or None in dims[1:] or full.count(-1) > 1:
        raise unsupported(node.name, node.op, f"target shape {dims}")
    target, static = full[1:], list(x.shape[1:])
    batch_first = dims[0] is None or dims[0] == -1 or dims[0] == x.shape[0]
    if batch_first and None not in static and _fits(target, int(np.prod(static, dtype=np.int64))):
        return [L.Reshape(tuple(target), name=ctx.name(node))(x)]
    return [ops.reshape(x, full)]


def _fits(target: list[int], size: int) -> bool:
    known = int(np.prod([d for d in target if d != -1], dtype=np.int64))
    return known == size if -1 not in target else known > 0 and size % known == 0


def _squeeze(ctx: Context, node: Node) -> list[Any]:
    x = ctx.tensor(node, 0)
    dims = attr_list(node.attr, "squeeze_dims")
    if not dims:
        dims = [i for i, d in enumerate(x.shape) if i and d == 1]
    return [ops.squeeze(x, axis=tuple(dims))]


def _transpose(ctx: Context, node: Node) -> list[Any]:
    x, perm = ctx.tensor(node, 0), [int(p) for p in ctx.const(node, 1)]
    if perm and perm[0] == 0:
        return [L.Permute(tuple(perm[1:]), name=ctx.name(node))(x)]
    return [ops.transpose(x, perm)]


def _resize(interpolation: str) -> Converter:
    def convert(ctx: Context, node: Node) -> list[Any]:
        if node.attr["align_corners"].b or not node.attr["half_pixel_centers"].b:
            raise unsupported(node.name, node.op, "align_corners or no half-pixel centres")
        height, width = (int(v) for v in ctx.const(node, 1))
        layer = L.Resizing(height, width, interpolation=interpolation, name=ctx.name(node))
        return [layer(ctx.tensor(node, 0))]

    return convert


def _shape(ctx: Context, node: Node) -> list[Any]:
    """Shape of a tensor: static, with the batch size as its two stand-ins."""
    dims = list(ctx.tensor(node, 0).shape)
    if None in dims[1:]:
        raise unsupported(node.name, node.op, f"a dynamic shape {dims}")
    dtype = np_dtype(node.attr["out_type"].type)
    values = [np.asarray([s if d is None else d for d in dims], dtype) for s in BATCH_STANDINS]
    return [Sym.of(values)]


def _cast(ctx: Context, node: Node) -> list[Any]:
    dtype = np.dtype(np_dtype(node.attr["DstT"].type)).name
    return [ops.cast(ctx.tensor(node, 0), dtype)]


CONVERTERS: dict[str, Converter] = {
    "Conv2D": _conv2d,
    "DepthwiseConv2dNative": _depthwise,
    "MatMul": _matmul,
    "BatchMatMulV2": _matmul,
    "BatchMatMulV3": _matmul,
    "FusedBatchNorm": _fused_bn,
    "FusedBatchNormV2": _fused_bn,
    "FusedBatchNormV3": _fused_bn,
    "_Affine": _affine_node,
    "Add": _binary,
    "AddV2": _binary,
    "BiasAdd": _binary,
    "Sub": _binary,
    "Mul": _binary,
    "RealDiv": _binary,
    "Maximum": _binary,
    "Minimum": _binary,
    "AddN": _add_n,
    "Relu": _activation(lambda n: L.ReLU(name=n)),
    "Relu6": _activation(lambda n: L.ReLU(max_value=6.0, name=n)),
    "Elu": _activation(lambda n: L.ELU(name=n)),
    "LeakyRelu": _leaky,
    "Selu": _activation(lambda n: L.Activation("selu", name=n)),
    "Sigmoid": _activation(lambda n: L.Activation("sigmoid", name=n)),
    "Tanh": _activation(lambda n: L.Activation("tanh", name=n)),
    "Softplus": _activation(lambda n: L.Activation("softplus", name=n)),
    "Softsign": _activation(lambda n: L.Activation("softsign", name=n)),
    "Softmax": _activation(lambda n: L.Softmax(axis=-1, name=n)),
    "_Swish": _activation(lambda n: L.Activation("swish", name=n)),
    "Abs": _unary(ops.absolute),
    "Neg": _unary(ops.negative),
    "Square": _unary(ops.square),
    "Sqrt": _unary(ops.sqrt),
    "Rsqrt": _unary(ops.rsqrt),
    "Exp": _unary(ops.exp),
    "Log": _unary(ops.log),
    "Cast": _cast,
    "ConcatV2": _concat,
    "MaxPool": _pool(L.MaxPooling2D),
    "AvgPool": _pool(L.AveragePooling2D),
    "Mean": _reduce(L.GlobalAveragePooling2D, ops.mean),
    "Max": _reduce(L.GlobalMaxPooling2D, ops.max),
    "Sum": _reduce(None, ops.sum),
    "Pad": _pad,
    "PadV2": _pad,
    "MirrorPad": _pad,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "ExpandDims": lambda ctx, node: [ops.expand_dims(ctx.tensor(node, 0), int(ctx.const(node, 1)))],
    "Transpose": _transpose,
    "ResizeBilinear": _resize("bilinear"),
    "ResizeNearestNeighbor": _resize("nearest"),
    "Shape": _shape,
}
