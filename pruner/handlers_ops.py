"""Handlers for keras.ops nodes in a functional graph, grouped Conv and GroupNormalization.

Ops are looked up by exact class like layers. Channel-wise ops (activations,
``cast``, ``abs``...) and ops that only move or reduce non-channel axes
(``mean``/``sum``/``max`` over space, the squeeze of squeeze-and-excitation;
``pad``, ``image.resize``, pooling, ``expand_dims``, ``squeeze``, slicing
other axes, reshapes and transposes that keep the channel axis last) pass
channels through. ``split`` and a static channel slice cut the channels
into consecutive parts pruned independently
(:meth:`secateur.pruner.graph.ChannelGraph.split`); their arguments follow
the kept counts through ``ConfigEdit.compute``. Grouped convolutions and
GroupNormalization prune whole groups
(:meth:`secateur.pruner.graph.ChannelGraph.blocks`). Anything that reduces,
reorders or indexes the channel axis is refused, which freezes its groups.

Registers on import; :mod:`secateur.pruner.tracing` imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from secateur.pruner import layout as lay
from secateur.pruner._keras import keras
from secateur.pruner.graph import ChannelGraph, ConfigEdit, KeptFn, Unrefinable
from secateur.pruner.handlers import Call, Unsupported, _conv, _prod, register_handler
from secateur.pruner.layout import Layout

L = keras.layers
CALL_KEY = "call:1"  # a GetItem node's key: its second positional call argument


def _axes(axis: Any, rank: int) -> set[int] | None:
    """Normalised axes of a reduction; None for every axis."""
    if axis is None:
        return None
    values = axis if isinstance(axis, (list, tuple)) else [axis]
    return {int(a) % rank for a in values}


def _passthrough(c: Call) -> list[Layout]:
    return [c.x for _ in c.out_shapes]


def _kept_counts(graph: ChannelGraph, parts: Sequence[Layout], kept: KeptFn) -> list[int]:
    return [len(lay.kept_positions(graph.expand(p), kept)) for p in parts]


def _split_parts(c: Call, sizes: Sequence[int]) -> list[Layout]:
    try:
        return c.graph.split(c.x, sizes)
    except Unrefinable as exc:
        raise Unsupported(str(exc)) from exc


# -- ops that cut the channels into parts ------------------------------------


def _split(c: Call) -> list[Layout]:
    rank = len(c.in_shapes[0])
    if int(c.layer.axis) % rank != rank - 1:
        return _passthrough(c)
    sizes = [s[-1] for s in c.out_shapes]
    if any(s is None for s in sizes):
        raise Unsupported("split of a channel axis of unknown size")
    parts = _split_parts(c, sizes)
    graph = c.graph

    def indices(old: Any, kept: KeptFn) -> list[int]:
        return np.cumsum(_kept_counts(graph, parts, kept))[:-1].astype(int).tolist()

    graph.add_edit(ConfigEdit(c.path, "indices_or_sections", c.x, compute=indices))
    return parts


def normalised_key(key: Any, rank: int) -> list[Any]:
    """A GetItem key as one entry per input axis (Ellipsis expanded)."""
    entries = list(key) if isinstance(key, (tuple, list)) else [key]
    if any(e is None for e in entries):
        raise Unsupported("indexing with newaxis")
    if Ellipsis not in entries:
        entries.append(Ellipsis)
    at = entries.index(Ellipsis)
    fill = rank - (len(entries) - 1)
    if fill < 0:
        raise Unsupported(f"key {key!r} has more entries than the tensor has axes")
    return [*entries[:at], *([slice(None)] * fill), *entries[at + 1 :]]


def _get_item(c: Call) -> list[Layout]:
    args = c.node.arguments.args
    if len(args) != 2 or c.node.arguments.kwargs:
        raise Unsupported("unexpected GetItem call")
    rank = len(c.in_shapes[0])
    entries = normalised_key(args[1], rank)
    if any(isinstance(e, keras.KerasTensor) for e in entries):
        raise Unsupported("indexing with a tensor")
    last = entries[-1]
    if isinstance(last, slice) and last == slice(None):
        return [c.x]
    channels = c.in_shapes[0][-1]
    if not isinstance(last, slice) or channels is None:
        raise Unsupported("indexing the channel axis")
    try:
        start, stop, step = last.indices(int(channels))
    except TypeError as exc:  # bounds computed from a tensor
        raise Unsupported(f"channel slice {last!r} is not a static range") from exc
    if step != 1 or stop <= start:
        raise Unsupported(f"channel slice {last!r} is not a static range")
    before, taken, _ = _split_parts(c, [start, stop - start, int(channels) - stop])
    graph = c.graph

    def key(old: Any, kept: KeptFn) -> Any:
        lo, n = _kept_counts(graph, [before, taken], kept)
        new = normalised_key(old, rank)
        new[-1] = slice(lo, lo + n)
        return tuple(new)

    graph.add_edit(ConfigEdit(c.path, CALL_KEY, c.x, compute=key))
    return [taken]


# -- ops that join or move along the channel axis ----------------------------


def _concatenate(c: Call) -> list[Layout]:
    if int(c.layer.axis) % c.rank != c.rank - 1:
        return [c.graph.unify(c.inputs, c.path)]
    return [tuple(item for lo in c.inputs for item in lo)]


def _reduce(c: Call) -> list[Layout]:
    rank = len(c.in_shapes[0])
    axes = _axes(c.layer.axis, rank)
    if axes is None or rank - 1 in axes:
        raise Unsupported(f"reduces the channel axis (axis={c.layer.axis})")
    return [c.x]


def _pad(c: Call) -> list[Layout]:
    rank = len(c.in_shapes[0])
    try:
        width = np.broadcast_to(np.asarray(c.layer.pad_width, dtype=np.int64), (rank, 2))
    except ValueError as exc:
        raise Unsupported(f"pad_width {c.layer.pad_width!r}") from exc
    if width[-1].any():
        raise Unsupported("pads the channel axis")
    return [c.x]


def _resize(c: Call) -> list[Layout]:
    """image.resize, max_pool, average_pool: per channel over space."""
    fmt = c.layer.data_format or keras.config.image_data_format()
    if fmt != "channels_last":
        raise Unsupported(f"data_format={fmt!r}; only channels_last is traced")
    return [c.x]


def _expand_dims(c: Call) -> list[Layout]:
    rank = len(c.out_shapes[0])
    axes = _axes(c.layer.axis, rank)
    if axes is None or rank - 1 in axes:
        raise Unsupported("a new axis after the channels moves the channel axis")
    return [c.x]


def _squeeze(c: Call) -> list[Layout]:
    rank = len(c.in_shapes[0])
    axes = _axes(c.layer.axis, rank)
    if (axes is None and c.in_shapes[0][-1] == 1) or (axes is not None and rank - 1 in axes):
        raise Unsupported("squeezes the channel axis")
    return [c.x]


def _reshape(c: Call) -> list[Layout]:
    """A reshape keeping the last axis keeps every channel's index (row-major order)."""
    channels = c.in_shapes[0][-1]
    if channels is None or c.out_shapes[0][-1] != channels:
        raise Unsupported(
            f"reshape {c.in_shapes[0][1:]} -> {c.out_shapes[0][1:]} does not keep the channel axis"
        )
    graph, x = c.graph, c.x

    def newshape(old: Any, kept: KeptFn) -> Any:
        shape = list(old)
        if shape and shape[-1] == channels:  # -1 or None is inferred again
            shape[-1] = len(lay.kept_positions(graph.expand(x), kept))
        return type(old)(shape) if isinstance(old, (list, tuple)) else shape

    graph.add_edit(ConfigEdit(c.path, "newshape", x, compute=newshape))
    return [x]


def _transpose(c: Call) -> list[Layout]:
    rank = len(c.in_shapes[0])
    axes = c.layer.axes
    if axes is None or int(list(axes)[-1]) % rank != rank - 1:
        raise Unsupported(f"permutation {axes} moves the channel axis")
    return [c.x]


def _binary(c: Call) -> list[Layout]:
    """maximum / minimum: scalars broadcast; tensors share channels."""
    for arg in c.node.arguments._flat_arguments:
        if not isinstance(arg, keras.KerasTensor) and np.size(arg) != 1:
            raise Unsupported("non-scalar constant operand")
    out_c = c.out_shapes[0][-1]
    full = [lo for lo, s in zip(c.inputs, c.in_shapes) if not (s[-1] == 1 and out_c != 1)]
    return [c.graph.unify(full, c.path)] if full else [c.inputs[0]]


# -- layers that prune whole groups of channels ------------------------------


def _blocks(c: Call, layout: Layout, b: int, what: str) -> Layout:
    try:
        return c.graph.blocks(layout, b)
    except Unrefinable as exc:
        raise Unsupported(f"{what}: {exc}") from exc


def _grouped_conv(c: Call) -> list[Layout]:
    """Conv with 1 < groups: group j reads input block j, writes output block j."""
    groups, cin = int(c.layer.groups), c.in_shapes[0][-1]
    if groups == 1 or groups == cin == c.layer.filters:
        return _conv(c)
    c.channels_last()
    if cin is None:
        raise Unsupported(f"grouped convolution (groups={groups}) of unknown input width")
    out = c.produce(c.layer.filters)
    what = f"grouped convolution (groups={groups})"
    units = _blocks(c, c.x, int(cin) // groups, what)
    c.graph.unify([units, _blocks(c, out, int(c.layer.filters) // groups, what)], c.path)
    # The kernel's input axis holds one group's channels: whole groups keep it.
    c.weight("kernel", -1, out, "out")
    c.weight("bias", 0, out, "bias")
    c.edit("filters", out)
    c.edit("groups", units)
    c.flops("kernel", _prod(c.out_shapes[0][1:-1]))
    return [out]


def _group_norm(c: Call) -> list[Layout]:
    """Statistics per group of channels: removing a whole group leaves the others'."""
    if int(c.layer.axis) % c.rank != c.rank - 1:
        raise Unsupported(f"axis={c.layer.axis}; only the channel axis is traced")
    channels = c.in_shapes[0][-1]
    if channels is None:
        raise Unsupported("channel axis of unknown size")
    groups = int(channels) if int(c.layer.groups) == -1 else int(c.layer.groups)
    units = _blocks(c, c.x, int(channels) // groups, f"GroupNormalization (groups={groups})")
    c.weight("gamma", 0, c.x, "scale")
    c.weight("beta", 0, c.x, "shift")
    c.edit("groups", units)
    return [c.x]


register_handler(L.Conv1D, L.Conv2D, L.Conv3D)(_grouped_conv)
register_handler(L.GroupNormalization)(_group_norm)


# -- registration of the op classes --------------------------------------------

# Channel-wise ops: each output channel is a function of the same input channel.
UNARY = (
    "numpy.Absolute",
    "numpy.Abs",
    "numpy.Negative",
    "numpy.Square",
    "numpy.Sqrt",
    "numpy.Exp",
    "numpy.Log",
    "numpy.Tanh",
    "numpy.Sign",
    "numpy.Reciprocal",
    "numpy.Clip",
    "numpy.Sin",
    "numpy.Cos",
    "numpy.Floor",
    "numpy.Ceil",
    "numpy.Round",
    "numpy.Expm1",
    "numpy.Log1p",
    "math.Rsqrt",
    "nn.Relu",
    "nn.Relu6",
    "nn.Sigmoid",
    "nn.Silu",
    "nn.Gelu",
    "nn.HardSigmoid",
    "nn.HardSilu",
    "nn.LeakyRelu",
    "nn.Elu",
    "nn.Selu",
    "nn.Softplus",
    "nn.Softsign",
    "nn.Celu",
    "nn.SparsePlus",
    "nn.Squareplus",
    "nn.TanhShrink",
    "nn.HardTanh",
    "nn.SoftShrink",
    "nn.HardShrink",
    "nn.Threshold",
    "core.Cast",
    "core.StopGradient",
)

_HANDLERS: dict[str, Callable[[Call], list[Layout]]] = {
    "numpy.Split": _split,
    "numpy.GetItem": _get_item,
    "numpy.Concatenate": _concatenate,
    "numpy.Mean": _reduce,
    "numpy.Sum": _reduce,
    "numpy.Max": _reduce,
    "numpy.Min": _reduce,
    "numpy.Amax": _reduce,
    "numpy.Amin": _reduce,
    "numpy.Pad": _pad,
    "image.Resize": _resize,
    "nn.MaxPool": _resize,
    "nn.AveragePool": _resize,
    "numpy.ExpandDims": _expand_dims,
    "numpy.Squeeze": _squeeze,
    "numpy.Maximum": _binary,
    "numpy.Power": _binary,  # x ** 2: per channel for a scalar exponent
    "numpy.Reshape": _reshape,
    "numpy.Transpose": _transpose,
    "numpy.Minimum": _binary,
}


def op_class(name: str) -> type | None:
    """``"numpy.Split"`` -> ``keras.src.ops.numpy.Split``, None where Keras lacks it."""
    module, cls = name.split(".")
    try:
        mod = __import__(f"keras.src.ops.{module}", fromlist=[cls])
    except ImportError:  # pragma: no cover - Keras internals moved
        return None
    found = getattr(mod, cls, None)
    return found if isinstance(found, type) else None


def op_classes(*names: str) -> list[type]:
    """The op classes of ``names`` (see :func:`op_class`) that this Keras has."""
    return [cls for cls in map(op_class, names) if cls is not None]


def _register() -> None:
    register_handler(*op_classes(*UNARY))(_passthrough)
    for name, fn in _HANDLERS.items():
        register_handler(*op_classes(name))(fn)


_register()
