"""Build the physically smaller model a plan describes.

The new model is made from the original's config with new widths
(``filters``, ``units``, reshape targets, nested input shapes), then each
layer receives the kept slices of the original weights. No masks, no
wrappers: the result is an ordinary Keras model of smaller shapes.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np

from secateur.pruner import layout as lay
from secateur.pruner._keras import keras
from secateur.pruner.compensation import (
    Compensation,
    bias_values,
    cached_weights,
    fold,
    new_biases,
)
from secateur.pruner.constant_tracing import trace_constants
from secateur.pruner.constants import WeightGetter
from secateur.pruner.errors import PlanMismatchError
from secateur.pruner.graph import ChannelGraph, ConfigEdit, KeptFn
from secateur.pruner.plan import PruningPlan, keep_function
from secateur.pruner.tracing import analyze


def apply_plan(
    model: Any,
    plan: PruningPlan,
    reload_weights: bool = True,
    graph: ChannelGraph | None = None,
    bias_compensation: bool | None = None,
) -> Any:
    """Build the pruned model that ``plan`` describes.

    Args:
        model: the model the plan was made for (or an identical copy).
        plan: from :func:`make_plan` or ``PruningPlan.from_dict``.
        reload_weights: copy the kept slices of the original weights; when
            False the new model keeps its fresh initialisation (the study's
            no-reload arm).
        graph: the model's traced graph, if already computed.
        bias_compensation: fold removed channels' constant outputs into the
            next layer's bias, computed from ``model``'s current weights
            (default: as the plan's spec says; off for plans that predate it).

    Returns:
        A new ``keras.Model``; ``model`` is left untouched.

    Warns:
        UserWarning: compensation found a caveat the plan does not carry
            (the weights changed since planning), e.g. a constant that a
            zero-padded Conv can only take in approximately.

    Raises:
        PlanMismatchError: the plan's groups do not match the model's.
        EmptyGroupError: the plan keeps no channel in some group.
    """
    plan.validate()
    graph = graph or analyze(model)
    kept = keep_function(graph, _match_groups(graph, plan))
    config = _edited_config(model, graph, kept)
    if bias_compensation is None:
        bias_compensation = bool(plan.spec.get("bias_compensation", False))
    comp = None
    # Each weight is read once, for the constants and for the copy alike.
    weights = cached_weights(graph)
    if bias_compensation:
        comp = _compensation(model, graph, plan, kept, weights) if reload_weights else None
        # Fresh weights get the planned architecture, biases included.
        for path in new_biases(graph, comp) if comp else plan.bias_added:
            _layer_config(config, path)["config"]["use_bias"] = True
    custom = _custom_objects(model)
    with keras.saving.custom_object_scope(custom):
        new_model = model.__class__.from_config(config)
    if reload_weights:
        _copy_weights(graph, new_model, kept, comp, weights)
    if getattr(model, "compiled", False):
        # Compile state is a convenience: a custom loss that cannot be rebuilt
        # from config must not fail the prune.
        try:
            new_model.compile_from_config(model.get_compile_config())
        except Exception:  # noqa: BLE001
            pass
    return new_model


def _match_groups(graph: ChannelGraph, plan: PruningPlan) -> dict[int, np.ndarray]:
    """Map the model's group ids to the plan's kept indices."""
    by_key = {tuple(sorted(g.origins)): g for g in plan.groups}
    out: dict[int, np.ndarray] = {}
    for g in graph.groups():
        pg = by_key.get(g.key)
        if pg is None or pg.size_before != g.size:
            got = "missing" if pg is None else f"{pg.size_before} channels"
            raise PlanMismatchError(
                f"the plan does not describe this model: group {list(g.key)} has "
                f"{g.size} channels in the model. Received: {got} in the plan "
                f"(plan made for model '{plan.model_name}')"
            )
        if pg.size_after < g.size and g.frozen:
            raise PlanMismatchError(
                f"the plan prunes group {list(g.key)}, which this model cannot prune "
                f"({'; '.join(g.frozen)}). Received: {pg.size_after} of {g.size} kept"
            )
        out[g.id] = np.asarray(pg.kept, dtype=np.int64)
    if len(by_key) != len(out):
        raise PlanMismatchError(
            f"the plan has {len(by_key)} groups but the model has {len(out)}. "
            f"Received: plan for model '{plan.model_name}'"
        )
    return out


def _layer_config(config: dict[str, Any], path: str) -> dict[str, Any]:
    """The config dict of the layer at ``path`` ("outer/inner") in a model config."""
    node: dict[str, Any] = {"config": config}
    for name in path.split("/"):
        for entry in node["config"]["layers"]:
            if entry.get("config", {}).get("name") == name or entry.get("name") == name:
                node = entry
                break
        else:
            raise PlanMismatchError(f"layer '{path}' not found in the model config")
    return node


def _edited_config(model: Any, graph: ChannelGraph, kept: KeptFn) -> dict[str, Any]:
    """``model``'s config with every channel count changed to the kept one."""
    config = copy.deepcopy(model.get_config())
    _drop_build_configs(config)
    for edit in graph.edits.values():
        _apply_edit(config, edit, kept)
    return config


def _drop_build_configs(config: dict[str, Any]) -> None:
    """Let layers build from the tensors they are called on.

    A layer's ``build_config`` records its old input shape; rebuilding from
    it would create weights of the old width. Nested models keep theirs,
    corrected by the ``build_input_shape`` edits.
    """
    for entry in config.get("layers", []):
        if "layers" in entry.get("config", {}):
            _drop_build_configs(entry["config"])
        else:
            entry.pop("build_config", None)


def _apply_edit(config: dict[str, Any], edit: ConfigEdit, kept: KeptFn) -> None:
    entry = _layer_config(config, edit.layer)
    cfg = entry["config"]
    if edit.compute is not None:
        cfg[edit.key] = edit.compute(cfg.get(edit.key), kept)
        return
    new = len(lay.kept_positions(edit.layout, kept))
    if edit.key == "build_input_shape":
        # Nested Sequential: its recorded build shape has the old width.
        for holder in (cfg, entry.get("build_config") or {}):
            for key in ("build_input_shape", "input_shape"):
                if holder.get(key):
                    holder[key] = [*holder[key][:-1], new]
        return
    if edit.kind == "size":
        cfg[edit.key] = new
    elif edit.kind == "last_dim":
        shape = list(cfg[edit.key])
        if shape[-1] not in (-1, None):
            shape[-1] = new
        cfg[edit.key] = shape
    else:  # flat
        cfg[edit.key] = [-1] if list(cfg[edit.key]) == [-1] else [new]


def _custom_objects(model: Any) -> dict[str, Any]:
    """Non-Keras layer classes in the model, so custom layers deserialize.

    Keras's own classes are left to Keras: their short names collide (the
    ``Add`` layer and the ``Add`` op) and Keras resolves them by module.
    """
    out: dict[str, Any] = {}
    stack = [model]
    while stack:
        m = stack.pop()
        for layer in m.layers:
            cls = type(layer)
            if not cls.__module__.startswith("keras."):
                out[cls.__name__] = cls
                out[keras.saving.get_registered_name(cls)] = cls
            if isinstance(layer, keras.Model):
                stack.append(layer)
    return out


def _resolve(model: Any, path: str) -> Any:
    layer = model
    for name in path.split("/"):
        layer = layer.get_layer(name)
    return layer


def _compensation(
    model: Any, graph: ChannelGraph, plan: PruningPlan, kept: KeptFn, weights: WeightGetter
) -> Compensation:
    comp = fold(graph, trace_constants(model, graph, weights), kept, weights)
    planned = {n for g in plan.groups for n in g.notes}
    fresh = [n for notes in comp.notes.values() for n in notes if n not in planned]
    if fresh:
        warnings.warn(
            "bias compensation cannot keep outputs exact: " + "; ".join(fresh[:5]),
            stacklevel=3,
        )
    return comp


def _copy_weights(
    graph: ChannelGraph,
    new_model: Any,
    kept: KeptFn,
    comp: Compensation | None,
    weights: WeightGetter,
) -> None:
    positions: dict[int, np.ndarray] = {}
    deltas = comp.deltas if comp is not None else {}
    for path, layer in graph.layers.items():
        values = []
        bias = getattr(layer, "bias", None) if path in deltas else None
        for idx, var in enumerate(layer.weights):
            value = weights(path, idx)
            if bias is not None and var is bias:
                value = value + deltas[path].astype(value.dtype)
            for axis, ax in sorted(graph.axes.get((path, idx), {}).items()):
                key = id(ax.layout)
                if key not in positions:
                    positions[key] = lay.kept_positions(ax.layout, kept)
                if len(positions[key]) != value.shape[axis]:
                    value = np.take(value, positions[key], axis=axis)
            values.append(value)
        added = bias_values(graph, comp, path, kept) if comp is not None else None
        if added is not None:
            values.append(added)  # Conv/Dense create their bias last
        _resolve(new_model, path).set_weights(values)
