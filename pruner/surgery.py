"""Build the physically smaller model a plan describes.

The new model is rebuilt node by node from the old functional graph
(:mod:`rebuild`): layers the plan changes are re-created from their own
edited configs (new ``filters``, ``units``, reshape targets, nested input
widths), unchanged layers are cloned, and each layer receives the kept
slices of the original weights, matched by graph position. No masks, no
wrappers: the result is an ordinary Keras model of smaller shapes that
shares no variable with the original.

Where the time goes (about 80 % in Keras's own per-layer construction and
build, which its ``from_config`` floor pays too): docs/surgery_speed.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from secateur.pruner import layout as lay
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
from secateur.pruner.graph import ChannelGraph, KeptFn
from secateur.pruner.plan import PruningPlan, keep_function
from secateur.pruner.rebuild import rebuild
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
        A new model that shares no variable with ``model``, which is left
        untouched: a Sequential for a Sequential, otherwise a functional
        ``keras.Model``. A ``keras.Model`` subclass built functionally (a
        keras-hub ``Backbone``) is pruned through its functional graph and
        comes back as a plain functional ``keras.Model``. With
        ``reload_weights=False`` every layer is freshly initialised, except
        layers whose class cannot be re-created from its config, which are
        copied with their weights.

    Warns:
        UserWarning: compensation found a caveat the plan does not carry
            (the weights changed since planning), e.g. a constant that a
            zero-padded Conv can only take in approximately.

    Raises:
        PlanMismatchError: the plan's groups do not match the model's.
        EmptyGroupError: the plan keeps no channel in some group.
        UnsupportedModelError: a changed layer cannot be re-created from its
            config (only for plans made without the plan-time check).
    """
    plan.validate()
    graph = graph or analyze(model)
    kept = keep_function(graph, _match_groups(graph, plan))
    if bias_compensation is None:
        bias_compensation = bool(plan.spec.get("bias_compensation", False))
    comp = None
    added: list[str] = []
    # Each weight is read once, for the constants and for the copy alike.
    weights = cached_weights(graph)
    if bias_compensation:
        comp = _compensation(model, graph, plan, kept, weights) if reload_weights else None
        # Fresh weights get the planned architecture, biases included.
        added = new_biases(graph, comp) if comp else list(plan.bias_added)
    # Weights start at their kept values (recreate.call_seeded); the rest are set.
    values = _kept_values(graph, kept, comp, weights) if reload_weights else None
    new_model, new_layers, seeded = rebuild(model, graph, kept, added, values)
    _set_weights(new_layers, seeded, values)
    _restore_compile(model, new_model)
    return new_model


def _set_weights(
    layers: dict[str, Any], seeded: set[str], values: Callable[[str], list[np.ndarray]] | None
) -> None:
    if values is None:
        return
    for path, layer in layers.items():
        if path not in seeded:
            layer.set_weights(values(path))


def _restore_compile(model: Any, new_model: Any) -> None:
    if getattr(model, "compiled", False):
        # Compile state is a convenience: a custom loss that cannot be rebuilt
        # from config must not fail the prune.
        try:
            new_model.compile_from_config(model.get_compile_config())
        except Exception:  # noqa: BLE001
            pass


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


def _kept_values(
    graph: ChannelGraph, kept: KeptFn, comp: Compensation | None, weights: WeightGetter
) -> Callable[[str], list[np.ndarray]]:
    """path -> the new layer's weights: the kept slices of the old ones, in order."""
    positions: dict[int, np.ndarray] = {}
    deltas = comp.deltas if comp is not None else {}

    def values(path: str) -> list[np.ndarray]:
        layer = graph.layers[path]
        out = []
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
            out.append(value)
        added = bias_values(graph, comp, path, kept) if comp is not None else None
        if added is not None:
            out.append(added)  # Conv/Dense create their bias last
        return out

    return values
