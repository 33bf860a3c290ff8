"""Walk a model propagating what is known, without data, about each channel.

The per-channel states, the rule registry and the maths live in
:mod:`constants`; the rules themselves in :mod:`constant_rules`. This module
sits above both, so importing it registers the rules and neither of them
imports the walker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from secateur.pruner import constant_rules, constant_rules_ops  # noqa: F401  (registers the rules)
from secateur.pruner.constants import (
    ConstantTrace,
    Ctx,
    State,
    WeightGetter,
    channels,
    rule_for,
)
from secateur.pruner.graph import ChannelGraph
from secateur.pruner.inline import inline_graph
from secateur.pruner.tracing import functional_of, is_graph_model


def trace_constants(model: Any, graph: ChannelGraph, weights: WeightGetter) -> ConstantTrace:
    """Walk ``model`` (already traced into ``graph``) propagating channel states.

    Args:
        model: the functional or Sequential model ``graph`` was traced from.
        graph: its :class:`ChannelGraph` (for tensor layouts).
        weights: returns a layer's weight ``(path, index)`` as numpy.

    Returns:
        Every foldable consumer input and every place a constant is lost.
    """
    fn = functional_of(model)
    trace = ConstantTrace()
    ins = [State.unknown(channels(t)) for t in fn.inputs]
    _walk(trace, graph, weights, fn, "", ins)
    return trace


def _walk(
    trace: ConstantTrace,
    graph: ChannelGraph,
    weights: WeightGetter,
    fn: Any,
    prefix: str,
    in_states: Sequence[State],
) -> list[State]:
    states: dict[int, State] = {id(t): s for t, s in zip(fn.inputs, in_states)}
    for depth in sorted(fn._nodes_by_depth, reverse=True):
        for node in fn._nodes_by_depth[depth]:
            if node.is_input or node.operation is None:
                continue
            ins = [states[id(t)] for t in node.input_tensors]
            op = node.operation
            sub = inline_graph(node)  # a block traced through its sub-layers
            if sub is not None or is_graph_model(op):
                inner = sub if sub is not None else functional_of(op)
                outs = _walk(trace, graph, weights, inner, prefix + op.name + "/", ins)
            else:
                outs = _call(Ctx(trace, graph, weights, op, prefix + op.name, node, ins))
            for t, s in zip(node.outputs, outs):
                states[id(t)] = s
    return [states[id(t)] for t in fn.outputs]


def _call(ctx: Ctx) -> list[State]:
    rule = rule_for(ctx.layer)
    outs = rule(ctx) if rule is not None else None
    if outs is None:
        for i, st in enumerate(ctx.ins):
            ctx.lose(i, st.live_constant)
        outs = [State.unknown(channels(t)) for t in ctx.node.outputs]
    return outs
