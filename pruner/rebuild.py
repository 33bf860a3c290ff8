"""Rebuild a traced model node by node, with the widths a plan keeps.

The old functional graph is walked in topological order, as Keras itself
runs a functional model, and every node is re-applied to new tensors:

- a layer the plan changes (a config edit whose value changes, a sliced
  weight axis that gets shorter, a bias that compensation adds) is
  re-created from its own edited config and built by calling it;
- an unchanged layer is cloned from its own config and must produce weights
  of the same shapes; a class that does not round-trip is deep-copied;
- a keras.ops node gets an operation re-created from its (edited)
  ``get_config()``; a stateless operation that does not round-trip and that
  no edit changes is reused;
  edits keyed ``"call:<i>"`` / ``"call:<name>"`` change the node's i-th
  positional / named call argument instead (a ``GetItem`` key);
- nested functional and Sequential models are rebuilt recursively, with new
  inputs of the kept width, and called like the old ones;
- a block layer the tracer inlined (:mod:`inline`) is rebuilt as its
  sub-graph: its sub-layers appear directly in the new model.

Old and new layers are matched by graph position (the layer path the tracer
used), never by name: Keras may rename a layer it re-creates. The new model
shares no variable with the old one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secateur.pruner import layout as lay
from secateur.pruner._keras import keras
from secateur.pruner.errors import SecateurError, UnsupportedModelError
from secateur.pruner.graph import ChannelGraph, ConfigEdit, KeptFn
from secateur.pruner.inline import inline_graph
from secateur.pruner.recreate import (
    CALL_EDIT,
    call_seeded,
    copy_layer,
    custom_objects,
    recreate,
)
from secateur.pruner.tracing import functional_of, is_graph_model


@dataclass
class _Walk:
    graph: ChannelGraph
    kept: KeptFn
    added_bias: set[str]
    custom: dict[str, Any]
    values: Callable[[str], list[np.ndarray]] | None = None
    # Paths whose new layer was built with its final weights (call_seeded).
    seeded: set[str] = field(default_factory=set)
    edits: dict[str, list[ConfigEdit]] = field(default_factory=dict)
    axes: dict[str, list[int]] = field(default_factory=dict)
    memo: dict[int, Any] = field(default_factory=dict)
    layers: dict[str, Any] = field(default_factory=dict)
    positions: dict[int, np.ndarray] = field(default_factory=dict)
    # Layer names taken in the model being built: Keras renames some layers
    # it re-creates, and inlined blocks bring sub-layers named alike.
    names: set[str] = field(default_factory=set)

    def kept_count(self, layout: lay.Layout) -> int:
        key = id(layout)
        if key not in self.positions:
            self.positions[key] = lay.kept_positions(layout, self.kept)
        return len(self.positions[key])


def rebuild(
    model: Any,
    graph: ChannelGraph,
    kept: KeptFn,
    added_bias: Iterable[str] = (),
    values: Callable[[str], list[np.ndarray]] | None = None,
) -> tuple[Any, dict[str, Any], set[str]]:
    """The pruned architecture of ``model``, and its layers by old path.

    Args:
        model: a functional or Sequential model, or a ``keras.Model``
            subclass built functionally (keras-hub backbones).
        graph: ``model``'s traced graph.
        kept: space id -> kept channel indices.
        added_bias: paths of layers that gain a bias (``use_bias=True``).
        values: path -> the new layer's weights, in order, for the layers
            of ``graph.layers``; new layers are built with them where Keras
            lets (:func:`call_seeded`). None: fresh initialisation.

    Returns:
        ``(new_model, layers, seeded)``: a Sequential for a Sequential, otherwise a
        functional ``keras.Model`` (a subclass's own class and attributes are
        not kept); ``layers`` maps every path of ``graph.layers`` to its new
        layer, whose weights the caller sets (unchanged ones have the old
        shapes, changed ones the kept ones). Re-created and cloned layers are
        freshly initialised; deep-copied ones (a class that does not
        round-trip) hold the old weights. ``seeded`` lists the paths whose
        new layer already holds ``values(path)``; the caller sets the others.

    Raises:
        UnsupportedModelError: the model is not a graph model, a changed
            layer cannot be re-created or built from its edited config, or
            Keras refuses the rebuilt graph (the message carries its error).
    """
    walk = _Walk(graph, kept, set(added_bias), custom_objects(model), values)
    for edit in graph.edits.values():
        walk.edits.setdefault(edit.layer, []).append(edit)
    for path, idx in graph.axes:
        walk.axes.setdefault(path, []).append(idx)
    try:
        new_model = _model(walk, model, "", top=True)
    except SecateurError:
        raise
    except Exception as exc:  # Keras raises anything; callers get a typed error
        raise UnsupportedModelError(
            f"the pruned model of '{model.name}' cannot be rebuilt. "
            f"Received: {type(exc).__name__}: {exc}"
        ) from exc
    missing = sorted(set(graph.layers) - set(walk.layers))
    if missing:  # pragma: no cover - the walk visits what the tracer visited
        raise UnsupportedModelError(f"layers not rebuilt: {missing[:5]}")
    return new_model, walk.layers, walk.seeded


def _model(walk: _Walk, model: Any, path: str, top: bool = False) -> Any:
    """A new model for a (nested) graph model, with inputs of the kept widths."""
    fn = functional_of(model)
    inputs = [_new_input(walk, t) for t in fn.inputs]
    outer, walk.names = walk.names, {t._keras_history[0].name for t in inputs}
    outputs = _functional(walk, fn, path + "/" if path else "", inputs)
    walk.names = outer
    name = model.name
    if isinstance(model, keras.Sequential) and all(id(x) in walk.memo for x in model.layers):
        layers = [walk.memo[id(layer)] for layer in model.layers]
        return keras.Sequential([_new_input(walk, fn.inputs[0]), *layers], name=name)
    ins = keras.tree.pack_sequence_as(getattr(fn, "_inputs_struct", inputs), inputs)
    outs = keras.tree.pack_sequence_as(getattr(fn, "_outputs_struct", outputs), outputs)
    new = keras.Model(inputs=ins, outputs=outs, name=name)
    if not top and not model.trainable:
        new.trainable = False
    return new


def _new_input(walk: _Walk, tensor: Any) -> Any:
    shape = list(tensor.shape)
    layout = walk.graph.tensor_layouts.get(id(tensor))
    if layout is not None and len(shape) >= 2:
        shape[-1] = walk.kept_count(layout)
    return keras.Input(
        batch_shape=tuple(shape),
        dtype=tensor.dtype,
        sparse=bool(getattr(tensor, "sparse", False)),
        name=tensor._keras_history[0].name,
    )


def _functional(walk: _Walk, fn: Any, prefix: str, inputs: list[Any]) -> list[Any]:
    """Re-apply ``fn``'s nodes to new tensors; returns the new outputs."""
    tensors: dict[int, Any] = {id(t): new for t, new in zip(fn.inputs, inputs)}
    for depth in sorted(fn._nodes_by_depth, reverse=True):
        for node in fn._nodes_by_depth[depth]:
            if node.is_input or node.operation is None:
                continue
            op = node.operation
            path = prefix + op.name
            args, kwargs = node.arguments.fill_in(tensors)
            args, kwargs = _edit_call(walk, path, list(args), dict(kwargs))
            if is_graph_model(op):
                if id(op) not in walk.memo:
                    walk.memo[id(op)] = _model(walk, op, path)
                outs = walk.memo[id(op)](*args, **kwargs)
            elif (sub := inline_graph(node)) is not None:
                # A block the tracer walked through: its sub-layers, inline.
                ins = [tensors[id(t)] for t in node.input_tensors]
                outs = _functional(walk, sub, path + "/", ins)
            elif isinstance(op, keras.layers.Layer):
                outs = _call_layer(walk, op, path, args, kwargs)
            else:
                outs = _operation(walk, op, path)(*args, **kwargs)
            for old, new in zip(node.outputs, keras.tree.flatten(outs)):
                tensors[id(old)] = new
    return [tensors[id(t)] for t in fn.outputs]


def _edit_call(
    walk: _Walk, path: str, args: list[Any], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    for edit in walk.edits.get(path, ()):
        if not edit.key.startswith(CALL_EDIT) or edit.compute is None:
            continue
        where = edit.key[len(CALL_EDIT) :]
        if where.isdigit():
            args[int(where)] = edit.compute(args[int(where)], walk.kept)
        else:
            kwargs[where] = edit.compute(kwargs.get(where), walk.kept)
    return args, kwargs


def _operation(walk: _Walk, op: Any, path: str) -> Any:
    """A keras.ops operation re-created from its (edited) config.

    Operations hold no state; one whose config does not round-trip and that
    no edit changes is reused as it is.
    """
    if id(op) not in walk.memo:
        config, edited = _configs(walk, op, path)
        if edited is not None:
            new = _recreate_changed(walk, op, path, edited)
        else:
            try:
                new = recreate(op, config, walk.custom) if config is not None else op
            except Exception:  # noqa: BLE001 - stateless, so sharing it is exact
                new = op
        walk.memo[id(op)] = new
    return walk.memo[id(op)]


def _call_layer(walk: _Walk, op: Any, path: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Call the new layer for ``op`` on new tensors, creating it on first use."""
    new = walk.memo.get(id(op))
    if new is not None:
        return new(*args, **kwargs)
    config, edited = _configs(walk, op, path)
    if edited is not None or _resized(walk, op, path) or path in walk.added_bias:
        cfg = dict(edited if edited is not None else config or {})
        if path in walk.added_bias:
            cfg["use_bias"] = True
        new = _recreate_changed(walk, op, path, cfg)
        _unique_name(walk, new, path)
        try:
            outs = _seeded_call(walk, new, path, args, kwargs)
        except Exception as exc:
            raise _cannot(op, path, exc) from exc
    else:
        new, outs = _clone(walk, op, path, config, args, kwargs)
    walk.memo[id(op)] = new
    if path in walk.graph.layers:
        walk.layers[path] = new
    return outs


def _configs(walk: _Walk, op: Any, path: str) -> tuple[Any, Any]:
    """(config, edited config or None when no edit changes it); config None: no config."""
    try:
        config = op.get_config()
    except Exception:  # noqa: BLE001 - the class does not round-trip
        return None, None
    return config, _edited(walk, path, config)


def _clone(
    walk: _Walk, op: Any, path: str, config: Any, args: list[Any], kwargs: dict[str, Any]
) -> tuple[Any, Any]:
    """An unchanged layer: from its config with the same weight shapes, else a deep copy."""
    if config is not None:
        new = None
        try:
            new = recreate(op, config, walk.custom)
            _unique_name(walk, new, path)
            outs = _seeded_call(walk, new, path, args, kwargs)
            if [tuple(w.shape) for w in new.weights] == [tuple(w.shape) for w in op.weights]:
                return new, outs
            walk.seeded.discard(path)
        except Exception:  # noqa: BLE001 - fall back to a faithful copy
            pass
        if new is not None:
            walk.names.discard(new.name)
    new = copy_layer(op)
    _unique_name(walk, new, path)
    return new, new(*args, **kwargs)


def _seeded_call(walk: _Walk, new: Any, path: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Call (and so build) ``new``, seeding its weights with the path's values."""
    values = walk.values(path) if walk.values is not None and path in walk.graph.layers else None
    outs, seeded = call_seeded(new, values, lambda: new(*args, **kwargs))
    if seeded:
        walk.seeded.add(path)
    return outs


def _unique_name(walk: _Walk, layer: Any, path: str) -> None:
    """Keep the layer's name unless the model being built already has it."""
    if layer.name in walk.names:
        base = path.replace("/", "_")
        name, i = base, 1
        while name in walk.names:
            name, i = f"{base}_{i}", i + 1
        layer.name = name
    walk.names.add(layer.name)


def _edited(walk: _Walk, path: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """``config`` with the plan's edits, or None when no value changes."""
    edited = dict(config)
    changed = False
    for edit in walk.edits.get(path, ()):
        if edit.key.startswith(CALL_EDIT):
            continue
        old = config.get(edit.key)
        edited[edit.key] = _new_value(walk, edit, old)
        changed = changed or _differs(edited[edit.key], old)
    return edited if changed else None


def _new_value(walk: _Walk, edit: ConfigEdit, old: Any) -> Any:
    if edit.compute is not None:
        return edit.compute(old, walk.kept)
    new = walk.kept_count(edit.layout)
    if edit.kind == "size":
        return new
    if edit.kind == "last_dim":
        shape = list(old)
        if shape[-1] not in (-1, None):
            shape[-1] = new
        return type(old)(shape) if isinstance(old, tuple) else shape
    return [-1] if list(old) == [-1] else [new]  # flat


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) != isinstance(b, (list, tuple)):
        return True  # split sections 2 -> split indices [2]: same number, other meaning
    try:
        return bool(np.any(np.asarray(a, dtype=object) != np.asarray(b, dtype=object)))
    except Exception:  # noqa: BLE001 - incomparable values: treat as changed
        return a is not b


def _resized(walk: _Walk, op: Any, path: str) -> bool:
    """Whether the plan shortens any axis of the layer's weights."""
    for idx in walk.axes.get(path, ()):
        shape = op.weights[idx].shape
        for axis, ax in walk.graph.axes[(path, idx)].items():
            if walk.kept_count(ax.layout) != shape[axis]:
                return True
    return False


def _recreate_changed(walk: _Walk, op: Any, path: str, config: dict[str, Any]) -> Any:
    try:
        return recreate(op, config, walk.custom)
    except Exception as exc:
        raise _cannot(op, path, exc) from exc


def _cannot(op: Any, path: str, exc: Exception) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"layer '{path}' ({type(op).__name__}) cannot be re-created with its pruned "
        f"config; plan it again with this version of the pruner, which freezes such "
        f"layers. Received: {type(exc).__name__}: {exc}"
    )
