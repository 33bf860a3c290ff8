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

from secateur.pruner._keras import keras
from secateur.pruner.handlers import handler_for

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
        None when the layer's class has a handler, is not registered for
        inlining, or its ``call`` does not record as a graph (it then stays
        one opaque layer).
    """
    # A registered handler wins; looking one up also registers optional
    # libraries' inlinable classes (handlers.on_registry_miss).
    if handler_for(node.operation) is not None or type(node.operation) not in _INLINABLE:
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
            isinstance(t, keras.KerasTensor) and tuple(t.shape) == tuple(o.shape)
            for t, o in zip(outs, node.outputs)
        ):
            return None
        return keras.Model([fresh[i] for i in ids], outs, name=node.operation.name)
    except Exception:  # noqa: BLE001 - any failure leaves the layer opaque
        return None
