"""Walk a Keras model's functional graph into a :class:`ChannelGraph`.

The tracer visits every node in topological order and asks the layer's
handler (:mod:`handlers`, looked up by exact class) how the call's output
channels relate to its inputs; nested functional models are walked in
place. A layer without a handler, or one its handler refuses, freezes every
space it touches, with the reason recorded.

This module sits above both :mod:`graph` (the data structure) and
:mod:`handlers` (the registry), so neither imports the other's caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Sibling handler modules register on import.
from secateur.pruner import handlers_attention, handlers_layers, handlers_ops, probes  # noqa: F401
from secateur.pruner import layout as lay
from secateur.pruner._keras import keras
from secateur.pruner.errors import UnsupportedModelError
from secateur.pruner.graph import ChannelGraph, ConfigEdit
from secateur.pruner.handlers import Call, Unsupported, handler_for
from secateur.pruner.inline import inline_graph
from secateur.pruner.layout import Layout
from secateur.pruner.recreate import CALL_EDIT, custom_objects, recreate_error


def functional_of(model: Any) -> Any:
    """The functional graph behind a Functional or built Sequential model.

    Raises:
        UnsupportedModelError: subclassed models, unbuilt Sequentials.
    """
    if isinstance(model, keras.Sequential):
        fn = getattr(model, "_functional", None)
        if fn is None:
            raise UnsupportedModelError(
                "A Sequential model must be built with a known input shape "
                "(start it with keras.Input) before it can be pruned. "
                f"Received: unbuilt Sequential '{model.name}'"
            )
        return fn
    if isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth"):
        return model
    raise UnsupportedModelError(
        "Only functional and Sequential Keras models can be traced; a "
        "subclassed model's call() is Python code whose channel flow cannot be "
        "read. Rebuild it with the functional API. "
        f"Received: {type(model).__module__}.{type(model).__name__}"
    )


def is_graph_model(obj: Any) -> bool:
    return isinstance(obj, keras.Sequential) or (
        isinstance(obj, keras.Model) and hasattr(obj, "_nodes_by_depth")
    )


def analyze(model: Any) -> ChannelGraph:
    """Trace ``model`` into a :class:`ChannelGraph`.

    Args:
        model: a functional or Sequential ``keras.Model``.

    Returns:
        The traced graph; ``graph.groups()`` lists the channel groups.

    Raises:
        UnsupportedModelError: the model is not a traceable graph model.
    """
    fn = functional_of(model)
    graph = ChannelGraph()
    inputs = [
        graph.new_space(
            _last_dim(t), f"input:{t._keras_history[0].name}", frozen="touches model input"
        )
        for t in fn.inputs
    ]
    outputs = trace_functional(graph, fn, "", inputs)
    for out in outputs:
        graph.freeze(out, "touches model output")
    _freeze_unrecreatable(graph, model)
    return graph


def _freeze_unrecreatable(graph: ChannelGraph, model: Any) -> None:
    """Freeze the groups of every layer a plan could change but surgery cannot re-create.

    Surgery re-creates a changed layer from its edited config; a class that
    does not round-trip through ``get_config``/``from_config`` can only be
    copied as it is, so its channels must stay. Checked once per layer (once
    per class for Keras's own layers), and only for layers with a weight axis
    or config entry in a prunable space.
    """
    layouts: dict[str, list[Layout]] = {}
    for (path, _), per_axis in graph.axes.items():
        layouts.setdefault(path, []).extend(ax.layout for ax in per_axis.values())
    for edit in graph.edits.values():
        if not edit.key.startswith(CALL_EDIT):
            layouts.setdefault(edit.layer, []).append(edit.layout)
    custom: dict[str, Any] | None = None
    builtin_ok: set[type] = set()  # Keras's own classes: one instance checked is enough
    for path, los in layouts.items():
        op = graph.operations.get(path)
        if op is None or is_graph_model(op) or type(op) in builtin_ok:
            continue  # nested models and their inputs are rebuilt structurally
        if all(graph.spaces[s].frozen for lo in los for s in lay.spaces(lo)):
            continue
        if custom is None:
            custom = custom_objects(model)
        why = recreate_error(op, custom)
        if why is None and type(op).__module__.startswith("keras.src."):
            builtin_ok.add(type(op))
        if why is not None:
            cls, why = type(op).__name__, f"cannot be re-created from its config: {why}"
            reason = f"layer '{path}' ({cls}): {why}"
            graph.unsupported.append((path, cls, why))
            for lo in los:
                graph.freeze(lo, reason)


def trace_functional(
    graph: ChannelGraph, fn: Any, prefix: str, in_layouts: Sequence[Layout]
) -> list[Layout]:
    """Walk ``fn``'s nodes in topological order, returning output layouts."""
    tensors: dict[int, Layout] = {id(t): lo for t, lo in zip(fn.inputs, in_layouts)}
    for depth in sorted(fn._nodes_by_depth, reverse=True):
        for node in fn._nodes_by_depth[depth]:
            if node.is_input or node.operation is None:
                continue
            ins = [tensors[id(t)] for t in node.input_tensors]
            outs = trace_node(graph, node, prefix, ins)
            for t, lo in zip(node.outputs, outs):
                tensors[id(t)] = lo
    graph.tensor_layouts.update(tensors)
    return [tensors[id(t)] for t in fn.outputs]


def trace_node(graph: ChannelGraph, node: Any, prefix: str, ins: list[Layout]) -> list[Layout]:
    """Trace one node: a nested model in place, a layer through its handler."""
    op = node.operation
    path = prefix + op.name
    if is_graph_model(op):
        return _trace_nested(graph, op, path, ins)
    if (sub := inline_graph(node)) is not None:
        return trace_functional(graph, sub, path + "/", ins)  # a block, through its sub-layers
    graph.operations.setdefault(path, op)
    if getattr(op, "weights", None):
        graph.layers.setdefault(path, op)
    call = Call(
        graph,
        op,
        path,
        ins,
        [tuple(t.shape) for t in node.input_tensors],
        [tuple(t.shape) for t in node.outputs],
        node,
    )
    handler = handler_for(op)
    try:
        if handler is None:
            raise Unsupported(probes.unknown_reason(op))
        if getattr(op, "dtype_policy", None) is not None and getattr(
            op.dtype_policy, "quantization_mode", None
        ):
            raise Unsupported("quantized layers cannot be sliced")
        return handler(call)
    except Unsupported as exc:
        return _freeze_call(call, str(exc))


def _trace_nested(graph: ChannelGraph, model: Any, path: str, ins: list[Layout]) -> list[Layout]:
    inner = functional_of(model)
    for t, lo in zip(inner.inputs, ins):
        # The nested model's InputLayer is built with the channel count.
        input_layer = t._keras_history[0]
        graph.add_edit(ConfigEdit(path + "/" + input_layer.name, "batch_shape", lo, "last_dim"))
    graph.add_edit(ConfigEdit(path, "build_input_shape", ins[0], "last_dim"))
    return trace_functional(graph, inner, path + "/", ins)


def _freeze_call(call: Call, why: str) -> list[Layout]:
    cls = type(call.layer).__name__
    reason = f"layer '{call.path}' ({cls}): {why}"
    call.graph.unsupported.append((call.path, cls, why))
    for lo in call.inputs:
        call.graph.freeze(lo, reason)
    outs = []
    for i, shape in enumerate(call.out_shapes):
        dim = shape[-1] if len(shape) >= 2 else None
        outs.append(call.graph.memo_space(call.path, f"frozen{i}", dim, f"{call.path}:{i}"))
        call.graph.freeze(outs[-1], reason)
    return outs


def _last_dim(tensor: Any) -> int | None:
    shape = tensor.shape
    if len(shape) < 2:
        return None
    return shape[-1]
