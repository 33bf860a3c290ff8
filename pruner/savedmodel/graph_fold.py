"""Constant folding in numpy for an explicit allow-list of pure TensorFlow ops.

Everything in a signature function that does not depend on its inputs
(variable reads, BatchNorm's ``rsqrt(var + eps) * gamma``, bias reshapes,
shape arithmetic) is evaluated here, with numpy, from the op's attributes
and its already-folded inputs. An op outside :data:`FOLDERS` is refused by
the caller; nothing is ever handed to TensorFlow to run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Folder = Callable[[Any, list[np.ndarray]], list[np.ndarray]]


def np_dtype(enum: int) -> Any:
    import tensorflow as tf

    return tf.dtypes.as_dtype(enum).as_numpy_dtype


def attr_list(attr: Any, key: str) -> list[int]:
    return [int(v) for v in attr[key].list.i] if key in attr else []


def tensor_value(proto: Any) -> np.ndarray:
    """A ``TensorProto`` as a numpy array (parsing only)."""
    import tensorflow as tf

    return np.asarray(tf.make_ndarray(proto))


def _one(fn: Callable[..., Any]) -> Folder:
    return lambda attr, args: [np.asarray(fn(*args))]


def _same_type(fn: Callable[..., Any]) -> Folder:
    """A binary op whose result keeps its first operand's dtype (as TF's do)."""

    def fold(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(fn(args[0], args[1])).astype(args[0].dtype)]

    return fold


def _cast(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    return [args[0].astype(np_dtype(attr["DstT"].type))]


def _pack(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    return [np.stack(args, axis=int(attr["axis"].i))]


def _unpack(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    axis = int(attr["axis"].i)
    return [np.take(args[0], i, axis=axis) for i in range(args[0].shape[axis])]


def _concat(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    return [np.concatenate(args[:-1], axis=int(args[-1]))]


def _squeeze(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    dims = attr_list(attr, "squeeze_dims")
    return [np.squeeze(args[0], axis=tuple(dims)) if dims else np.squeeze(args[0])]


def _reshape(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    return [np.reshape(args[0], [int(d) for d in args[1]])]


def _transpose(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    return [np.transpose(args[0], [int(d) for d in args[1]])]


def _reduce(fn: Callable[..., Any]) -> Folder:
    def fold(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
        axes = tuple(int(a) for a in np.ravel(args[1]))
        keep = bool(attr["keep_dims"].b) if "keep_dims" in attr else False
        return [np.asarray(fn(args[0], axis=axes, keepdims=keep)).astype(args[0].dtype)]

    return fold


def strided_key(attr: Any, begin: Any, end: Any, strides: Any) -> tuple[Any, ...]:
    """A StridedSlice's begin/end/strides and masks as a numpy index."""
    masks = {k: int(attr[k].i) if k in attr else 0 for k in _MASKS}
    key: list[Any] = []
    for i, (b, e, s) in enumerate(zip(begin, end, strides)):
        bit = 1 << i
        if masks["ellipsis_mask"] & bit:
            key.append(Ellipsis)
        elif masks["new_axis_mask"] & bit:
            key.append(None)
        elif masks["shrink_axis_mask"] & bit:
            key.append(int(b))
        else:
            start = None if masks["begin_mask"] & bit else int(b)
            stop = None if masks["end_mask"] & bit else int(e)
            key.append(slice(start, stop, int(s)))
    return tuple(key)


_MASKS = ("begin_mask", "end_mask", "ellipsis_mask", "new_axis_mask", "shrink_axis_mask")


def _strided_slice(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(args[0][strided_key(attr, *args[1:4])])]


def _slice(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    x, begin, size = args
    key = tuple(slice(int(b), None if s < 0 else int(b) + int(s)) for b, s in zip(begin, size))
    return [np.asarray(x[key])]


def _gather(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    if int(attr["batch_dims"].i) if "batch_dims" in attr else 0:
        raise ValueError("GatherV2 with batch_dims")
    return [np.take(args[0], args[1], axis=int(args[2]))]


def _shape(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(args[0].shape, dtype=np_dtype(attr["out_type"].type))]


def _fill(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    return [np.full([int(d) for d in args[0]], args[1], dtype=args[1].dtype)]


def _range(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    start, limit, delta = (args[i].item() for i in range(3))
    return [np.arange(start, limit, delta).astype(np_dtype(attr["Tidx"].type))]


def _select(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    return [np.where(args[0], args[1], args[2])]


def _rsqrt(x: np.ndarray) -> np.ndarray:
    return (1 / np.sqrt(x)).astype(x.dtype)


def _identity(attr: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    return [args[0]]


FOLDERS: dict[str, Folder] = {
    "ReadVariableOp": _identity,
    "Identity": _identity,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Mul": _same_type(np.multiply),
    "AddV2": _same_type(np.add),
    "Add": _same_type(np.add),
    "Sub": _same_type(np.subtract),
    "RealDiv": _same_type(np.divide),
    "FloorDiv": _same_type(np.floor_divide),
    "FloorMod": _same_type(np.mod),
    "Maximum": _same_type(np.maximum),
    "Minimum": _same_type(np.minimum),
    "Pow": _same_type(np.power),
    "Neg": _one(np.negative),
    "Abs": _one(np.abs),
    "Square": _one(np.square),
    "Sqrt": _one(np.sqrt),
    "Rsqrt": _one(_rsqrt),
    "Reciprocal": _one(lambda x: (1 / x).astype(x.dtype)),
    "Exp": _one(np.exp),
    "Log": _one(np.log),
    "Cast": _cast,
    "Pack": _pack,
    "Unpack": _unpack,
    "ExpandDims": lambda attr, args: [np.expand_dims(args[0], int(args[1]))],
    "Squeeze": _squeeze,
    "ConcatV2": _concat,
    "StridedSlice": _strided_slice,
    "Slice": _slice,
    "GatherV2": _gather,
    "Shape": _shape,
    "Size": lambda attr, args: [np.asarray(args[0].size, np_dtype(attr["out_type"].type))],
    "Rank": lambda attr, args: [np.asarray(args[0].ndim, np.int32)],
    "Fill": _fill,
    "ZerosLike": _one(np.zeros_like),
    "OnesLike": _one(np.ones_like),
    "Range": _range,
    "Prod": _reduce(np.prod),
    "Sum": _reduce(np.sum),
    "Max": _reduce(np.max),
    "Min": _reduce(np.min),
    "Mean": _reduce(np.mean),
    "Tile": lambda attr, args: [np.tile(args[0], [int(m) for m in args[1]])],
    "BroadcastTo": lambda attr, args: [np.broadcast_to(args[0], [int(d) for d in args[1]])],
    "SelectV2": _select,
    "Select": _select,
}


# Batch size stand-ins: shape arithmetic on a tensor whose batch size is
# unknown is folded twice, once per stand-in; entries that differ follow the
# batch size (``ops.shape(x)[0]`` in a Flatten or a squeeze-excite reshape).
BATCH_STANDINS = (1009, 2003)


class Sym:
    """A folded value that depends on the batch size: one array per stand-in."""

    def __init__(self, values: tuple[np.ndarray, np.ndarray]) -> None:
        self.values = values

    @staticmethod
    def of(values: list[np.ndarray]) -> Any:
        """``values`` as a :class:`Sym`, or one array where both stand-ins agree."""
        a, b = values
        if a.shape == b.shape and np.array_equal(a, b):
            return a
        return Sym((a, b))

    def dims(self) -> list[int | None]:
        """The value as a shape: None for the batch size, -1 for a multiple of it.

        A multiple of the batch size is what Dense's tensordot folds the
        leading axes into (``[batch * 25, 4]``); it reshapes as ``-1``.
        """
        a, b = self.values
        if a.ndim != 1 or a.shape != b.shape:
            raise ValueError("not a shape vector")
        out: list[int | None] = []
        for x, y in zip(a.tolist(), b.tolist()):
            k, rest = divmod(int(x), BATCH_STANDINS[0])
            if x == y:
                out.append(int(x))
            elif (x, y) == BATCH_STANDINS:
                out.append(None)
            elif not rest and k > 0 and y == k * BATCH_STANDINS[1]:
                out.append(-1)
            else:
                raise ValueError("an entry derived from the batch size")
        return out
