"""Handlers for attention.

``keras.layers.MultiHeadAttention`` is traced as one layer with two kinds of
space:

- its *heads* (a space of ``num_heads``, kind ``"heads"``): head ``h`` owns
  slice ``h`` of the query/key/value (and gate) kernels, axis 1, and biases,
  axis 0, and of the output kernel, axis 0. Attention never mixes heads (the
  softmax runs over positions of one head), so removing a head removes its
  term of the output projection's sum and nothing else; ``num_heads`` is
  edited and ``key_dim``/``value_dim`` stay. Heads are allocated by
  ``PruneSpec.head_ratio``, apart from channels.
- the *channels* of its inputs and output: the query/key/value kernels read
  their input's channels on axis 0; without ``output_shape`` the output has
  the query's channels (the output kernel's axis 2 and bias follow the
  query's layout), so a residual stream through the layer stays prunable.
  An ``output_shape`` of one entry is a new space of that width.

``keras.layers.GroupQueryAttention`` is traced the same way; its head space
is the key/value heads, each carrying the query heads that share it.

Registers on import; :mod:`secateur.pruner.tracing` imports this module.
"""

from __future__ import annotations

from typing import Any

from secateur.pruner import attention_ops  # noqa: F401  (registers keras.ops attention)
from secateur.pruner import layout as lay
from secateur.pruner._keras import keras
from secateur.pruner.graph import FlopTerm, WeightAxis
from secateur.pruner.handlers import Call, Unsupported, _prod, _weight_index, register_handler
from secateur.pruner.layout import Inner, Layout

# Softmax weights sum to one, so head h adds b_v[h] @ W_o[h] to every output.
_VALUE_BIAS_NOTE = (
    "'{}': a removed head's value bias adds a constant (its value bias times its output "
    "rows) that is dropped, not folded into the output bias; heads whose value bias is "
    "zero are removed exactly"
)

# Sub-layers that project an operand into heads: the operand they read and
# whether their heads are query heads (True) or key/value heads (False).
_PROJECTIONS = (
    ("_query_dense", "query", True),
    ("_key_dense", "key", False),
    ("_value_dense", "value", False),
    ("_gate_dense", "query", True),
)
_SCORES_OUT = "its attention scores (one map per head) are an output of the model graph"


@register_handler(keras.layers.MultiHeadAttention)
def _multi_head_attention(c: Call) -> list[Layout]:
    layer = c.layer
    shape = layer._output_shape
    if shape and len(shape) != 1:  # refused before anything is recorded
        raise Unsupported(f"output_shape={tuple(shape)} is not one channel axis")
    operands = _operands(c)
    heads = _head_space(c, int(layer.num_heads))
    out = _output_layout(c, operands["query"][0])
    _wire(c, operands, heads, heads, out)
    c.edit("num_heads", heads)
    why = _heads_coupled(layer, len(operands["query"][1]))
    if why is None and len(c.out_shapes) > 1:
        why = _SCORES_OUT
    if why is not None:
        c.graph.freeze(heads, f"heads of '{c.path}': {why}")
    else:
        _attention_flops(c, operands["query"][1], operands["value"][1], layer.attention_axes)
    return [out, *_score_outputs(c)]


@register_handler(keras.layers.GroupQueryAttention)
def _grouped_query_attention(c: Call) -> list[Layout]:
    """Key/value head j serves query heads j*r .. j*r + r - 1 (``ops.repeat``).

    The head space is the key/value heads; removing one removes its r query
    heads with it, so ``num_query_heads`` stays r times ``num_key_value_heads``.
    """
    layer = c.layer
    operands = _operands(c)
    kv = _head_space(c, int(layer.num_key_value_heads))
    repeats = int(layer.num_repeats)
    q_heads = kv if repeats == 1 else (Inner(kv, repeats),)
    out = operands["query"][0]  # feature_dim is the query's width
    _wire(c, operands, q_heads, kv, out)
    c.edit("num_query_heads", q_heads)
    c.edit("num_key_value_heads", kv)
    if len(c.out_shapes) > 1:
        c.graph.freeze(kv, f"heads of '{c.path}': {_SCORES_OUT}")
    else:
        _attention_flops(c, operands["query"][1], operands["value"][1], (1,))
    return [out, *_score_outputs(c)]


def _head_space(c: Call, n: int) -> Layout:
    heads = c.graph.memo_space(c.path, "heads", n, f"{c.path}:heads")
    for sid in set(lay.spaces(heads)):
        c.graph.spaces[sid].kind = "heads"
    return heads


def _wire(
    c: Call,
    operands: dict[str, tuple[Layout, tuple[Any, ...]]],
    q_heads: Layout,
    kv_heads: Layout,
    out: Layout,
) -> None:
    """The weight axes and FLOPs of the projections in and out of the heads."""
    layer = c.layer
    for attr, operand, of_query in _PROJECTIONS:
        dense = getattr(layer, attr, None)
        if dense is None:  # no gate
            continue
        layout, shape = operands[operand]
        heads = q_heads if of_query else kv_heads
        _axis(c, dense.kernel, 0, layout, "in")
        _axis(c, dense.kernel, 1, heads, "out")
        _axis(c, dense.bias, 0, heads, "bias")
        _flops(c, dense.kernel, shape)
    output = layer._output_dense
    _axis(c, output.kernel, 0, q_heads, "out")
    _axis(c, output.kernel, 2, out, "out")
    _axis(c, output.bias, 0, out, "bias")
    _flops(c, output.kernel, operands["query"][1])
    if layer._value_dense.bias is not None:
        c.graph.note(kv_heads, _VALUE_BIAS_NOTE.format(c.path))


def _score_outputs(c: Call) -> list[Layout]:
    outs = []
    for i, shape in enumerate(c.out_shapes[1:], start=1):
        scores = c.graph.memo_space(c.path, f"scores{i}", shape[-1], f"{c.path}:scores")
        c.graph.freeze(scores, f"'{c.path}' returns attention scores, not channels")
        outs.append(scores)
    return outs


def _operands(c: Call) -> dict[str, tuple[Layout, tuple[Any, ...]]]:
    """Layout and shape of the call's query, value and key (key defaults to value)."""
    args = list(c.node.arguments.args)
    kwargs = c.node.arguments.kwargs
    found: dict[str, Any] = {}
    for i, name in enumerate(("query", "value", "key")):
        found[name] = args[i] if i < len(args) else kwargs.get(name)
    if found["key"] is None:
        found["key"] = found["value"]
    out = {}
    for name, tensor in found.items():
        index = next((i for i, t in enumerate(c.node.input_tensors) if t is tensor), None)
        if index is None:
            raise Unsupported(f"its {name} is not a tensor of the graph")
        out[name] = (c.inputs[index], c.in_shapes[index])
    return out


def _output_layout(c: Call, query: Layout) -> Layout:
    shape = c.layer._output_shape
    if not shape:
        return query  # the output projection maps back to the query's channels
    out = c.produce(int(shape[0]), key="out")
    c.edit("output_shape", out, "last_dim")
    return out


def _heads_coupled(layer: Any, rank: int) -> str | None:
    """Why heads cannot be pruned apart, or None.

    Inputs of rank r are projected to rank r + 1 (..., heads, dim); attention
    must run over axes 1 .. r - 2 only, never the head or feature axis.
    """
    axes = layer.attention_axes
    if axes is None:
        return None
    if any(not 1 <= int(a) <= rank - 2 for a in axes):
        return f"attention_axes={tuple(axes)} include the head or feature axis"
    return None


def _axis(c: Call, var: Any, axis: int, layout: Layout, role: str) -> None:
    if var is None:  # use_bias=False
        return
    index = _weight_index(c.layer, var)
    name = var.path.rsplit("/", 2)[-2] + "/" + var.name if "/" in var.path else var.name
    c.graph.add_axis(WeightAxis(c.path, index, name, axis % len(var.shape), layout, role))


def _flops(c: Call, var: Any, shape: tuple[Any, ...], more: tuple[Any, ...] = ()) -> None:
    """``2 * size(var)`` FLOPs at every position of ``shape`` (times the ``more`` dims)."""
    index = _weight_index(c.layer, var)
    positions = _prod((*shape[1:-1], *more))
    c.graph.flops.append(FlopTerm(c.path, index, positions))


def _attention_flops(c: Call, query: tuple[Any, ...], value: tuple[Any, ...], axes: Any) -> None:
    """The scores (q.k) and the weighted sum of values, for every (query, key) pair.

    Per pair they cost ``2 * query heads * key_dim`` and ``2 * query heads *
    value_dim``: the sizes of the query bias and (MultiHeadAttention) the value
    bias, which shrink with the heads, so the biases stand for them. Grouped
    query attention repeats its values to every query head: the query bias
    stands for both. Without biases (use_bias False) these FLOPs are not counted.
    """
    q_bias = c.layer._query_dense.bias
    v_bias = q_bias if isinstance(c.layer, keras.layers.GroupQueryAttention) else None
    v_bias = v_bias if v_bias is not None else c.layer._value_dense.bias
    if q_bias is None or v_bias is None:
        return
    attended = tuple(value[int(a)] for a in axes)
    _flops(c, q_bias, query, attended)
    _flops(c, v_bias, query, attended)
