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
per-call state, no weights used directly as ``keras.ops`` operands that the
graph would see as constants, which in any case freeze instead of pruning).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from secateur.pruner._keras import keras
from secateur.pruner.handlers import handler_for

_KNP = "keras.src.ops.numpy"
_INLINABLE: set[type] = set()
# node -> its inlined graph (or None); entries go with the model's graph.
_CACHE: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


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
    if type(node.operation) not in _INLINABLE:
        return None
    if node not in _CACHE:
        _CACHE[node] = _build(node)
    return _CACHE[node]


def _build(node: Any) -> Any | None:
    fresh: dict[int, Any] = {}

    def replace(value: Any) -> Any:
        if isinstance(value, keras.KerasTensor):
            if id(value) not in fresh:
                fresh[id(value)] = keras.Input(batch_shape=value.shape, dtype=value.dtype)
            return fresh[id(value)]
        return value

    args = keras.tree.map_structure(replace, node.arguments.args)
    kwargs = keras.tree.map_structure(replace, node.arguments.kwargs)
    ids = [id(t) for t in node.input_tensors]
    if len(set(ids)) != len(ids):
        return None  # one tensor passed twice: inputs would not map one to one
    try:
        out = node.operation.call(*args, **kwargs)
        outs = keras.tree.flatten(out)
        if len(outs) != len(node.outputs) or not all(
            isinstance(t, keras.KerasTensor) and _compatible(t.shape, o.shape)
            for t, o in zip(outs, node.outputs)
        ):
            return None
        model = keras.Model([fresh[i] for i in ids], outs, name=node.operation.name)
        model = _pin_batch_reshapes(model)
        if model is None or not _same_outputs(node, model):
            return None
        return model
    except Exception:  # noqa: BLE001 - any failure leaves the layer opaque
        return None


def _compatible(a: Any, b: Any) -> bool:
    """Shapes of one rank that agree wherever both are known."""
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _pin_batch_reshapes(model: Any) -> Any | None:
    """The graph again, with reshapes that hold the unknown batch size pinned.

    ``ops.reshape(x, (ops.shape(x)[0], h, w, c))`` records ``None`` for the
    batch size, which only a symbolic tensor accepts. When every other size
    of its input is known, ``(-1, h, w, c)`` (any ``-1`` among the others
    worked out) is the same reshape. The graph is replayed in order so each
    pinned reshape gives the sizes the next one needs. None when a recorded
    reshape cannot be pinned so.
    """
    by_depth = model._nodes_by_depth
    nodes = [n for d in sorted(by_depth, reverse=True) for n in by_depth[d]]
    if not any(_is_reshape(n.operation) and None in tuple(n.operation.newshape) for n in nodes):
        return model
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in model.inputs]
    tensors: dict[int, Any] = {id(t): new for t, new in zip(model.inputs, inputs)}
    for node in nodes:
        if node.is_input or node.operation is None:
            continue
        op = node.operation
        if _is_reshape(op) and None in tuple(op.newshape):
            rest = _batch_free(list(op.newshape), tuple(tensors[id(node.input_tensors[0])].shape))
            if rest is None:
                return None
            op.newshape = (-1, *rest)
            auto = getattr(op, "_auto_config", None)
            if auto is not None:
                auto.config["newshape"] = op.newshape
        args, kwargs = node.arguments.fill_in(tensors)
        for old, new in zip(node.outputs, keras.tree.flatten(op(*args, **kwargs))):
            tensors[id(old)] = new
    return keras.Model(inputs, [tensors[id(t)] for t in model.outputs], name=model.name)


def _is_reshape(op: Any) -> bool:
    return type(op).__name__ == "Reshape" and type(op).__module__ == _KNP


def _batch_free(shape: list[Any], in_shape: tuple[Any, ...]) -> list[int] | None:
    """The sizes after the batch of ``reshape(x, shape)``, all known, or None."""
    rest = shape[1:]
    if shape[0] is not None or None in rest or rest.count(-1) > 1:
        return None
    if any(d is None for d in in_shape[1:]):
        return None
    total = int(np.prod(in_shape[1:], dtype=np.int64))
    known = int(np.prod([d for d in rest if d != -1], dtype=np.int64))
    if -1 in rest:
        if known == 0 or total % known:
            return None
        rest[rest.index(-1)] = total // known
    elif known != total:
        return None
    return [int(d) for d in rest]


def _same_outputs(node: Any, model: Any) -> bool:
    """The inlined graph computes what the layer does, on a random batch of 2.

    Skipped (trusted) when an input has unknown sizes besides the batch.
    """
    shapes = [tuple(t.shape) for t in node.input_tensors]
    if any(d is None for s in shapes for d in s[1:]) or any(
        not str(t.dtype).startswith("float") for t in node.input_tensors
    ):
        return True
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(2, *s[1:])).astype(t.dtype) for s, t in zip(shapes, node.input_tensors)]
    args, kwargs = node.arguments.fill_in({id(t): x for t, x in zip(node.input_tensors, xs)})
    want = keras.tree.flatten(node.operation(*args, **kwargs))
    got = keras.tree.flatten(model(xs))
    return all(
        np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5) for a, b in zip(want, got)
    )
