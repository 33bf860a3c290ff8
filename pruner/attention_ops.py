"""Attention written with keras.ops: whole heads through reshape, transpose, matmul, softmax.

Model code often writes attention by hand (keras-hub's MiT/SegFormer)::

    q = transpose(reshape(Dense(C)(x), (B, N, h, d)), (0, 2, 1, 3))   # same for k, v
    a = softmax(matmul(q, transpose(k, (0, 1, 3, 2))) * scale)
    y = Dense(C)(reshape(transpose(matmul(a, v), (0, 2, 1, 3)), (B, N, C)))

The tracer follows only the last axis, so this module follows the *head
axis* beside it. A reshape splitting the channels into ``(h, d)`` sees them
as ``h`` blocks of ``d`` (``ChannelGraph.blocks`` kind ``"heads"``, so
``PruneSpec.head_ratio`` allocates them) and marks its output as a per-head
tensor: the head layout and which axes hold the heads and one head's ``d``
features. Transposes, softmax, dropout and scalar scaling carry the mark;
a matmul of two marked tensors with the head axis as a batch axis couples
their heads (q with k, the scores with v); the reshape merging ``(h, d)``
back ends it with the channels ``Inner(heads, d)``, so the projection's
input rows follow the heads. Reshape targets are edited with the kept head
count.

Soundness: every consumer of a marked tensor must be one of these ops
(checked through the Keras graph when the mark is made), and each freezes
the heads, with a reason, on anything it does not recognise (the head axis
reduced, moved last or broadcast, a tensor operand, a marked tensor with no
consumer). The axis inside one head of a marked tensor is a frozen space
linked to the heads (``ChannelGraph.frozen_with``): whatever freezes it
later (a model output), or a weight or config entry that follows it (a
per-head tensor returned by a block and read outside), freezes the heads.
Channels within a head are not pruned.

Registers on import, wrapping the plain handlers of these classes;
:mod:`secateur.pruner.handlers_attention` imports this module.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from secateur.pruner import handlers_ops
from secateur.pruner import layout as lay
from secateur.pruner._keras import keras
from secateur.pruner.graph import ChannelGraph, ConfigEdit, KeptFn, Unrefinable
from secateur.pruner.handlers import _REGISTRY, Call, Handler, Unsupported, _prod, register_handler
from secateur.pruner.layout import Inner, Layout

NOT_TRACED = "attention written with keras.ops (reshape into heads/matmul): heads are not traced"


@dataclass(frozen=True)
class Heads:
    """The head axis of a per-head tensor."""

    heads: Layout  # one position per head
    axis: int  # the head axis
    feat: int | None  # the axis of one head's d features; None once contracted (scores)
    d: int


# graph -> id(tensor) -> its head axis, for every per-head tensor traced.
_MARKS: weakref.WeakKeyDictionary[ChannelGraph, dict[int, Heads]] = weakref.WeakKeyDictionary()
_AWARE: set[type] = set()


def _mark_of(c: Call, i: int) -> Heads | None:
    return _MARKS.get(c.graph, {}).get(id(c.node.input_tensors[i]))


def _marks(c: Call) -> list[Heads | None]:
    return [_mark_of(c, i) for i in range(len(c.node.input_tensors))]


def _consumers(tensor: Any) -> list[Any]:
    op = tensor._keras_history[0]
    nodes = getattr(op, "_outbound_nodes", [])
    return [n.operation for n in nodes if any(t is tensor for t in n.input_tensors)]


def _stop(c: Call, marks: list[Heads | None], why: str) -> Unsupported:
    """Freeze the heads of every marked input; the error to raise for the rest."""
    reason = f"heads reshaped out of channels at '{c.path}': {why}"
    for m in marks:
        if m is not None:
            c.graph.freeze(m.heads, reason)
    return Unsupported(f"{NOT_TRACED} ({why})")


def _mark(c: Call, mark: Heads, layout: Layout) -> list[Layout]:
    """Mark the call's output as a per-head tensor once its consumers are known to follow."""
    out = c.node.outputs[0]
    users = _consumers(out)
    strange = sorted({type(u).__name__ for u in users if type(u) not in _AWARE})
    if not users or strange:
        why = f"the per-head tensor goes to {', '.join(strange)}" if strange else "is an output"
        raise _stop(c, [mark], why)
    _MARKS.setdefault(c.graph, {})[id(out)] = mark
    for sid in lay.spaces(layout):  # a model output or opaque layer freezes it: the heads too
        c.graph.frozen_with.setdefault(sid, mark.heads)
    return [layout]


def _within(c: Call, size: Any, key: str) -> Layout:
    """The last axis of a per-head tensor: one head's features or positions, never pruned."""
    lo = c.graph.memo_space(c.path, key, size, f"{c.path}:{key}")
    for sid in lay.spaces(lo):  # not channels: left out of the prunable share
        c.graph.spaces[sid].kind = "inner"
    c.graph.freeze(lo, "axis inside one attention head (whole heads are pruned)")
    return lo


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _count(graph: ChannelGraph, layout: Layout, kept: KeptFn) -> int:
    return len(lay.kept_positions(graph.expand(layout), kept))


# -- the handlers ----------------------------------------------------------


def _reshape(c: Call, plain: Handler) -> list[Layout]:
    mark = _mark_of(c, 0)
    src, dst = c.in_shapes[0], c.out_shapes[0]
    if mark is not None:
        return _merge_heads(c, mark, src, dst)
    channels, h, d = src[-1], dst[-2] if len(dst) > 2 else None, dst[-1]
    if (
        len(dst) != len(src) + 1
        or None in (channels, h, d)
        or h * d != channels
        or d < 2
        or not _same(src[:-1], dst[:-2])
    ):
        tail = dst[len(src) - 1 :]
        if len(dst) > len(src) and None not in tail and _prod(tail) == channels:
            # e.g. a qkv Dense into (3, heads, features)
            raise Unsupported(f"{NOT_TRACED} (reshape {src[1:]} -> {dst[1:]})")
        return plain(c)
    users = _consumers(c.node.outputs[0])
    if not users or any(type(u) not in _AWARE for u in users):
        return plain(c)  # not attention: its channels stay channels
    d = int(d)  # known: checked above
    try:
        heads = c.graph.blocks(c.x, d, kind="heads")
    except Unrefinable as exc:
        raise Unsupported(f"{NOT_TRACED} ({exc})") from exc
    graph, n = c.graph, int(channels) // d

    def newshape(old: Any, kept: KeptFn) -> Any:
        shape = list(old)
        if shape[-2] == n:  # -1 is inferred again
            shape[-2] = _count(graph, heads, kept)
        return type(old)(shape) if isinstance(old, (list, tuple)) else shape

    graph.add_edit(ConfigEdit(c.path, "newshape", heads, compute=newshape))
    rank = len(dst)
    return _mark(c, Heads(heads, rank - 2, rank - 1, d), _within(c, d, "head_dim"))


def _merge_heads(c: Call, mark: Heads, src: tuple[Any, ...], dst: tuple[Any, ...]) -> list[Layout]:
    rank = len(src)
    if (
        mark.axis != rank - 2
        or mark.feat != rank - 1
        or len(dst) != rank - 1
        or dst[-1] != src[-2] * src[-1]
        or not _same(src[:-2], dst[:-1])
    ):
        raise _stop(c, [mark], f"reshape {src[1:]} -> {dst[1:]} does not merge (heads, features)")
    graph, heads, d, channels = c.graph, mark.heads, mark.d, dst[-1]

    def newshape(old: Any, kept: KeptFn) -> Any:
        shape = list(old)
        if shape[-1] == channels:
            shape[-1] = _count(graph, heads, kept) * d
        return type(old)(shape) if isinstance(old, (list, tuple)) else shape

    graph.add_edit(ConfigEdit(c.path, "newshape", heads, compute=newshape))
    return [(Inner(heads, d),)]


def _transpose(c: Call, plain: Handler) -> list[Layout]:
    mark = _mark_of(c, 0)
    if mark is None:
        return plain(c)
    rank = len(c.in_shapes[0])
    axes = c.layer.axes
    perm = list(range(rank))[::-1] if axes is None else [int(a) % rank for a in axes]
    if perm[-1] == mark.axis:
        raise _stop(c, [mark], f"permutation {perm} moves the head axis last")
    feat = None if mark.feat is None else perm.index(mark.feat)
    moved = replace(mark, axis=perm.index(mark.axis), feat=feat)
    layout = c.x if perm[-1] == rank - 1 else _within(c, c.out_shapes[0][-1], "last")
    return _mark(c, moved, layout)


def _matmul(c: Call, plain: Handler) -> list[Layout]:
    marks = _marks(c)
    if not any(marks):
        return plain(c)
    a, b = marks if len(marks) == 2 else (None, None)
    sa, sb = c.in_shapes if len(c.in_shapes) == 2 else ((), ())
    rank = len(sa)
    if a is None or b is None or len(sb) != rank or a.axis != b.axis or a.axis >= rank - 2:
        raise _stop(c, marks, "matmul whose operands do not share a batch head axis")
    if sa[a.axis] != sb[b.axis]:
        raise _stop(c, marks, "matmul broadcasts the head axis")
    if a.feat == rank - 1 and b.feat == rank - 2:  # q @ k^T: the scores of each head
        out = Heads(a.heads, a.axis, None, 0)
        layout = _within(c, c.out_shapes[0][-1], "last")
    elif a.feat is None and b.feat == rank - 1:  # scores @ v: each head's values
        out = Heads(a.heads, a.axis, rank - 1, b.d)
        layout = c.inputs[1]
    else:
        raise _stop(c, marks, "matmul contracts an axis other than one head's features")
    c.graph.unify([a.heads, b.heads], c.path)
    return _mark(c, out, layout)


def _softmax(c: Call, plain: Handler) -> list[Layout]:
    mark = _mark_of(c, 0)
    rank = len(c.in_shapes[0])
    axes = c.layer.axis if isinstance(c.layer.axis, (list, tuple)) else [c.layer.axis]
    if mark is None and isinstance(c.layer, keras.layers.Softmax):
        return plain(c)
    if mark is None:  # ops.softmax: per channel unless over the channel axis
        if any(int(x) % rank == rank - 1 for x in axes):
            raise Unsupported("softmax over the channel axis mixes channels")
        return [c.x]
    if any(int(x) % rank in (mark.axis, mark.feat) for x in axes):
        raise _stop(c, [mark], f"softmax over axis {c.layer.axis} mixes heads or features")
    return _mark(c, mark, c.x)


def _scalar(c: Call, plain: Handler) -> list[Layout]:
    """Scaling by a constant (``* d ** -0.5``) keeps heads; a tensor operand freezes them."""
    marks = _marks(c)
    if not any(marks):
        return plain(c)
    scalars = [a for a in c.node.arguments._flat_arguments if not isinstance(a, keras.KerasTensor)]
    if len(marks) != 1 or len(scalars) != 1 or getattr(scalars[0], "ndim", 0) != 0:
        raise _stop(c, marks, "arithmetic with a tensor or a non-scalar constant")
    mark = marks[0]
    assert mark is not None
    return _mark(c, mark, c.x)


def _dropout(c: Call, plain: Handler) -> list[Layout]:
    mark = _mark_of(c, 0)
    return plain(c) if mark is None else _mark(c, mark, c.x)


def _register() -> None:
    knp = "numpy."
    wrappers: dict[str, Callable[[Call, Handler], list[Layout]]] = {
        knp + "Reshape": _reshape,
        knp + "Transpose": _transpose,
        knp + "Matmul": _matmul,
        "nn.Softmax": _softmax,
        knp + "Multiply": _scalar,
        knp + "Divide": _scalar,
        knp + "TrueDivide": _scalar,
    }
    classes: list[tuple[type, Callable[[Call, Handler], list[Layout]]]] = [
        (keras.layers.Dropout, _dropout),
        (keras.layers.Softmax, _softmax),
    ]
    for name, fn in wrappers.items():
        classes.extend((cls, fn) for cls in handlers_ops.op_classes(name))
    for cls, fn in classes:
        _AWARE.add(cls)
        register_handler(cls)(_wrap(fn, _REGISTRY.get(cls)))


def _wrap(fn: Callable[[Call, Handler], list[Layout]], plain: Handler | None) -> Handler:
    def unknown(c: Call) -> list[Layout]:
        raise Unsupported(f"{NOT_TRACED} (an operand is not split into heads)")

    return lambda c: fn(c, plain or unknown)


_register()
