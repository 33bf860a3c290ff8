"""Trace composite layers through their own sub-layers ("inlining").

Libraries such as keras-hub wrap whole blocks (an MBConv block, a ViT
encoder) in one custom ``Layer`` whose ``call`` invokes sub-layers and
``keras.ops``. To the tracer such a layer is opaque and freezes every channel
it touches. Calling its ``call`` directly on fresh ``KerasTensor`` inputs
records the same computation as a functional graph of its sub-layers (the
same objects, holding the same weights) and ops. The tracer walks that graph
in place, like a nested model, and surgery rebuilds the block as that graph.

Only classes registered with :func:`register_inline` are inlined: their
``call`` must depend on nothing but its tensor arguments and sub-layers (no
per-call state; a weight used directly as a ``keras.ops`` operand is seen as
a constant and freezes what it touches). The call is recorded at a sentinel
batch size, so code that computes with the batch size runs, then replayed on
inputs of any batch; the replayed graph must reproduce the layer's outputs
on random inputs, or the layer stays opaque.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from secateur.pruner._keras import keras
from secateur.pruner.handlers import handler_for

_KNP = "keras.src.ops.numpy"
_INLINABLE: set[type] = set()
# node -> its inlined graph (or None); entries go with the model's graph.
_CACHE: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()


def register_inline(*classes: type) -> None:
    """Trace the given exact layer classes through their sub-layers."""
    _INLINABLE.update(classes)


def is_inlinable(layer: Any) -> bool:
    return type(layer) in _INLINABLE


def inline_graph(node: Any) -> Any | None:
    """The functional graph of the layer call ``node``, or None.

    Args:
        node: a node of a functional graph.

    Returns:
        A functional ``keras.Model`` whose inputs match ``node.input_tensors``
        and whose outputs match ``node.outputs``, one to one and in order,
        built from the layer's own sub-layers; the same object on every call.
        None when the layer's class is not registered for inlining or its
        ``call`` does not record as a graph that computes what the layer
        does (it then stays one layer, traced by its handler if any).
    """
    # Looking a handler up registers optional libraries' classes
    # (handlers.on_registry_miss). Inlining wins: a handler registered for
    # an inlinable class only says why it stays opaque when inlining fails.
    handler_for(node.operation)
    if not is_inlinable(node.operation):
        return None
    with _LOCK:  # jobs trace models on several threads
        if node not in _CACHE:
            _CACHE[node] = _build(node)
        return _CACHE[node]


# The batch size the block's call is recorded with: code such as
# ``ops.shape(x)[0] // windows`` needs a number, and a prime no model uses
# as a size tells the batch apart in what the call records.
_BATCH = 7919


def _build(node: Any) -> Any | None:
    fresh: dict[int, Any] = {}

    def replace(value: Any) -> Any:
        if isinstance(value, keras.KerasTensor):
            if id(value) not in fresh:
                shape = tuple(value.shape)
                batch = _BATCH if shape and shape[0] is None else shape[0]
                fresh[id(value)] = keras.Input(batch_shape=(batch, *shape[1:]), dtype=value.dtype)
            return fresh[id(value)]
        return value

    args = keras.tree.map_structure(replace, node.arguments.args)
    kwargs = keras.tree.map_structure(replace, node.arguments.kwargs)
    ids = [id(t) for t in node.input_tensors]
    if len(set(ids)) != len(ids):
        return None  # one tensor passed twice: inputs would not map one to one
    try:
        with _tensor_outputs(node.operation):
            outs = keras.tree.flatten(node.operation.call(*args, **kwargs))
            outs = _tensor_prefix(node, outs)
            if outs is None:
                return None
            recorded = keras.Model([fresh[i] for i in ids], outs)
            model = _replay(recorded, node.input_tensors, node.operation.name)
            if model is None or not _same_outputs(node, model):
                return None
            return model
    except Exception:  # noqa: BLE001 - any failure leaves the layer opaque
        return None


def _tensor_prefix(node: Any, outs: list[Any]) -> list[Any] | None:
    """The recorded outputs that are tensors, or None when they do not fit.

    A call may end its outputs with values that are not symbolic tensors:
    None (attention scores not asked for) or constants (an empty tensor
    standing for "no hidden states"). Those are left out of the graph when
    nothing consumes the layer's matching outputs; callers zip the layer's
    outputs with the graph's, so those get no value.
    """
    n = next((i for i, t in enumerate(outs) if not isinstance(t, keras.KerasTensor)), len(outs))
    if len(outs) != len(node.outputs) or n == 0:
        return None
    if any(isinstance(t, keras.KerasTensor) for t in outs[n:]):
        return None
    if not all(_compatible(t.shape, o.shape) for t, o in zip(outs[:n], node.outputs)):
        return None
    dropped = {id(t) for t in node.outputs[n:]}
    used = (id(t) for user in node.operation._outbound_nodes for t in user.arguments.keras_tensors)
    return None if any(i in dropped for i in used) else outs[:n]


@contextlib.contextmanager
def _tensor_outputs(layer: Any) -> Iterator[None]:
    """Inlinable sub-layers of ``layer`` give a placeholder tensor for a None output.

    Keras records a call only when every output is a tensor; a block that
    returns ``(x, None)`` would stop the recording of the layer around it.
    The placeholder is never consumed (the calling code got None before);
    the sub-layers get their own method back afterwards.
    """
    patched = []
    for sub in layer._flatten_layers(include_self=False):
        if is_inlinable(sub) and "compute_output_spec" not in vars(sub):
            object.__setattr__(sub, "compute_output_spec", _no_none(sub.compute_output_spec))
            patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            object.__delattr__(sub, "compute_output_spec")


def _no_none(spec: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return keras.tree.map_structure(
            lambda v: keras.KerasTensor((0,)) if v is None else v, spec(*args, **kwargs)
        )

    return wrapped


def _compatible(a: Any, b: Any) -> bool:
    """Shapes of one rank that agree wherever both are known."""
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _replay(recorded: Any, like: Any, name: str) -> Any | None:
    """The recorded graph on inputs of any batch size, or None.

    A reshape whose first size is a multiple of the recording batch (the
    batch, or the batch times a window count) becomes ``(-1, *rest)`` with
    the rest as recorded; one that puts the batch elsewhere cannot.
    """
    by_depth = recorded._nodes_by_depth
    inputs = [keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype) for t in like]
    tensors: dict[int, Any] = {id(t): new for t, new in zip(recorded.inputs, inputs)}
    for node in (n for d in sorted(by_depth, reverse=True) for n in by_depth[d]):
        if node.is_input or node.operation is None:
            continue
        op = node.operation
        if _is_reshape(op) and not _unbatch(op, tuple(node.outputs[0].shape)):
            return None
        args, kwargs = node.arguments.fill_in(tensors)
        for old, new in zip(node.outputs, keras.tree.flatten(op(*args, **kwargs))):
            tensors[id(old)] = new
    return keras.Model(inputs, [tensors[id(t)] for t in recorded.outputs], name=name)


def _unbatch(op: Any, out: tuple[Any, ...]) -> bool:
    sizes = list(op.newshape)
    hits = [i for i, d in enumerate(sizes) if isinstance(d, int) and d > 0 and d % _BATCH == 0]
    if not hits:
        return None not in sizes
    if hits != [0] or any(d is None for d in out[1:]):
        return False
    op.newshape = (-1, *(int(d) for d in out[1:]))
    auto = getattr(op, "_auto_config", None)
    if auto is not None:
        auto.config["newshape"] = op.newshape
    return True


def _is_reshape(op: Any) -> bool:
    return type(op).__name__ == "Reshape" and type(op).__module__ == _KNP


def _same_outputs(node: Any, model: Any) -> bool:
    """The inlined graph computes what the layer does, on random inputs (batch 2).

    Skipped (trusted) when an input has unknown sizes besides the batch.
    """
    shapes = [tuple(t.shape) for t in node.input_tensors]
    if any(d is None for s in shapes for d in s[1:]) or any(
        not str(t.dtype).startswith("float") for t in node.input_tensors
    ):
        return True
    rng = np.random.default_rng(0)
    sizes = [(2, *s[1:]) if s and s[0] is None else s for s in shapes]  # tables have no batch
    xs = [rng.normal(size=s).astype(t.dtype) for s, t in zip(sizes, node.input_tensors)]
    args, kwargs = node.arguments.fill_in({id(t): x for t, x in zip(node.input_tensors, xs)})
    want = keras.tree.flatten(node.operation(*args, **kwargs))
    got = keras.tree.flatten(model(xs))
    return all(
        np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5) for a, b in zip(want, got)
    )
