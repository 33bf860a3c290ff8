"""Inline a SavedModel signature's functions into one flat op graph, as data.

A TF2 SavedModel's signature names a call node of the top-level GraphDef; the
function it calls (``FunctionDef`` in ``graph_def.library``) calls further
functions. This module copies every node of those functions into one graph,
each under its call path (``<call>/<node>``), so later passes see plain ops:
call nodes become their callees' nodes, ``Identity``/``IdentityN``/
``StopGradient`` become aliases of their inputs and ``NoOp`` and control
edges are dropped (nothing here runs, so nothing has to be ordered).

Variables reach a function as resource arguments: the signature function's
last ``len(bound_inputs)`` arguments are the object-graph nodes listed in
``object_graph.concrete_functions[fn].bound_inputs``. Each becomes a
``_Capture`` node carrying that object-graph node id; the importer reads its
value from the checkpoint (or the graph's constant, for captured constants).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from secateur.pruner.errors import UnsupportedModelError

Ref = tuple[str, int]  # (node name, flat output index)

CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
IDENTITY_OPS = frozenset({"Identity", "StopGradient", "Snapshot", "PreventGradient"})
CAPTURE = "_Capture"
MAX_CALL_DEPTH = 64


@dataclass
class Node:
    """One op of the flat graph.

    Attributes:
        name: unique name (the call path joined with ``/``).
        op: the TensorFlow op type (or an importer-made ``_`` op).
        inputs: data inputs as (node name, output index).
        attr: the op's ``AttrValue`` map (protobuf), read-only.
        fields: importer data (a capture's node id, a fused bias ...).
    """

    name: str
    op: str
    inputs: list[Ref]
    attr: Any
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class FlatGraph:
    """The inlined signature: nodes, aliases, and the signature's endpoints.

    Attributes:
        nodes: node name -> node.
        alias: output -> the output it stands for (Identity, call results).
        inputs: signature input key -> name of its ``Placeholder`` node.
        outputs: signature output key -> the output it reads.
    """

    nodes: dict[str, Node] = field(default_factory=dict)
    alias: dict[Ref, Ref] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Ref] = field(default_factory=dict)

    def resolve(self, ref: Ref) -> Ref:
        """The output ``ref`` stands for, through any chain of aliases."""
        seen = 0
        while ref in self.alias:
            ref = self.alias[ref]
            seen += 1
            if seen > len(self.alias):
                raise UnsupportedModelError(
                    f"a graph must not alias a tensor to itself. Received: a cycle at {ref[0]}"
                )
        return ref

    def producer(self, ref: Ref) -> Node:
        ref = self.resolve(ref)
        node = self.nodes.get(ref[0])
        if node is None:
            raise UnsupportedModelError(
                f"every tensor of a signature function must be produced by a node. "
                f"Received: a reference to the missing node '{ref[0]}'"
            )
        return node


def unsupported(node_name: str, op: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"the graph importer supports a fixed set of TensorFlow ops and patterns ({why}). "
        f"Received: op {op} at node '{node_name}'"
    )


def _output_index(node: Any, out_arg: str, idx: int) -> int:
    """Flat output index of ``node``'s output ``out_arg:idx`` (a FunctionDef reference)."""
    if node.op in CALL_OPS or node.op == "IdentityN":
        return idx
    from tensorflow.python.framework import op_def_registry

    op_def = op_def_registry.get(node.op)
    if op_def is None:
        raise unsupported(node.name, node.op, "the op is not registered in TensorFlow")
    offset = 0
    for arg in op_def.output_arg:
        if arg.name == out_arg:
            return offset + idx
        if arg.number_attr:
            offset += int(node.attr[arg.number_attr].i)
        elif arg.type_list_attr:
            offset += len(node.attr[arg.type_list_attr].list.type)
        else:
            offset += 1
    raise unsupported(node.name, node.op, f"it has no output named '{out_arg}'")


def _with_defaults(node: Any) -> dict[str, Any]:
    """The node's attributes plus its op's defaults (FunctionDefs omit default values)."""
    from tensorflow.python.framework import op_def_registry

    attrs = dict(node.attr.items())
    op_def = op_def_registry.get(node.op)
    for attr in op_def.attr if op_def is not None else ():
        if attr.name not in attrs and attr.HasField("default_value"):
            attrs[attr.name] = attr.default_value
    return attrs


class _Inliner:
    """Copies function bodies into one :class:`FlatGraph`, one call at a time."""

    def __init__(self, saved: Any) -> None:
        self.saved = saved
        graph_def = saved.meta_graph.graph_def
        self.library = {f.signature.name: f for f in graph_def.library.function}
        self.top = {n.name: n for n in graph_def.node}
        self.flat = FlatGraph()

    def inline_call(self, node: Any, prefix: str, args: list[Ref], depth: int) -> None:
        """Copy the callee of call ``node`` under ``prefix``; alias the call's outputs."""
        fn_name = node.attr["f"].func.name
        fn = self.library.get(fn_name)
        if fn is None:
            raise unsupported(node.name, node.op, f"it calls '{fn_name}', not in the library")
        if depth > MAX_CALL_DEPTH:
            raise unsupported(node.name, node.op, f"calls nest deeper than {MAX_CALL_DEPTH}")
        sig = fn.signature
        if len(args) != len(sig.input_arg):
            raise unsupported(
                node.name, node.op, f"{len(args)} arguments for {len(sig.input_arg)} parameters"
            )
        scope = {a.name: ref for a, ref in zip(sig.input_arg, args)}
        local = {n.name: n for n in fn.node_def}
        inner = prefix + "/"

        def parse(text: str) -> Ref:
            parts = text.split(":")
            if len(parts) == 1:
                if text not in scope:
                    raise unsupported(node.name, node.op, f"'{fn_name}' reads unknown '{text}'")
                return scope[text]
            src = local.get(parts[0])
            if src is None or len(parts) != 3:
                raise unsupported(node.name, node.op, f"'{fn_name}' reads unknown '{text}'")
            return (inner + parts[0], _output_index(src, parts[1], int(parts[2])))

        for body_node in fn.node_def:
            self.copy(body_node, inner + body_node.name, parse, depth)
        for i, out in enumerate(sig.output_arg):
            self.flat.alias[(prefix, i)] = parse(fn.ret[out.name])

    def copy(self, node: Any, name: str, parse: Any, depth: int) -> None:
        """Add ``node`` as ``name``: inline calls, alias identities, drop no-ops."""
        data = [parse(i) for i in node.input if not i.startswith("^")]
        if node.op in CALL_OPS:
            self.inline_call(node, name, data, depth + 1)
        elif node.op in IDENTITY_OPS:
            if data:
                self.flat.alias[(name, 0)] = data[0]
        elif node.op == "IdentityN":
            for i, ref in enumerate(data):
                self.flat.alias[(name, i)] = ref
        elif node.op != "NoOp":
            attrs = _with_defaults(node)
            self.flat.nodes[name] = Node(name, node.op, data, attrs, {"tf_name": node.name})

    def capture(self, node_id: int) -> Ref:
        name = f"_captured/{node_id}"
        if name not in self.flat.nodes:
            self.flat.nodes[name] = Node(name, CAPTURE, [], {}, {"node_id": node_id})
        return (name, 0)


def _parse_top(text: str) -> Ref:
    name, _, index = text.partition(":")
    return (name, int(index) if index else 0)


def _reachable_top(inliner: _Inliner, roots: list[str]) -> list[Any]:
    """Top-level nodes the signature's outputs depend on, stopping at captured arguments."""
    order, seen, stack = [], set(roots), list(roots)
    while stack:
        node = inliner.top.get(stack.pop())
        if node is None:
            continue
        order.append(node)
        data = [i for i in node.input if not i.startswith("^")]
        if node.op in CALL_OPS:
            data = data[: len(data) - len(_bound(inliner, node))]
        for text in data:
            src = _parse_top(text)[0]
            if src not in seen:
                seen.add(src)
                stack.append(src)
    return order


def _bound(inliner: _Inliner, node: Any) -> list[int]:
    fn = inliner.saved.object_graph.concrete_functions.get(node.attr["f"].func.name)
    return list(fn.bound_inputs) if fn is not None else []


def flatten(saved: Any, signature_key: str) -> FlatGraph:
    """Inline signature ``signature_key`` of ``saved`` into a :class:`FlatGraph`.

    ``signature_key`` must name a signature of ``saved``: :func:`import_graph`
    checks that first, through ``SavedModelFile.signature``.

    Raises:
        UnsupportedModelError: a TF1-style SavedModel (no object graph), or a
            call the importer cannot follow.
    """
    if not saved.object_graph.nodes:
        raise UnsupportedModelError(
            "the graph importer reads TF2 SavedModels (functions with an object graph); "
            f"TF1-style graphs are not supported. Received: no object graph in {saved.shown}"
        )
    sig = saved.meta_graph.signature_def[signature_key]
    inliner = _Inliner(saved)
    flat = inliner.flat
    flat.outputs = {k: _parse_top(v.name) for k, v in sig.outputs.items()}
    flat.inputs = {k: _parse_top(v.name)[0] for k, v in sig.inputs.items()}
    for node in _reachable_top(inliner, sorted({r[0] for r in flat.outputs.values()})):
        if node.op in CALL_OPS:
            data = [_parse_top(i) for i in node.input if not i.startswith("^")]
            bound = _bound(inliner, node)
            free = data[: len(data) - len(bound)]
            inliner.inline_call(node, node.name, free + [inliner.capture(b) for b in bound], 0)
        else:
            inliner.copy(node, node.name, _parse_top, 0)
    for key, name in flat.inputs.items():
        placeholder = flat.nodes.get(name)
        if placeholder is None or placeholder.op != "Placeholder":
            raise UnsupportedModelError(
                f"a signature input must be fed to a Placeholder of the graph. "
                f"Received: input '{key}' names '{name}' in {saved.shown}"
            )
        placeholder.fields["key"] = key
    return flat
