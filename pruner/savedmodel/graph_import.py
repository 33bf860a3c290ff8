"""Import a SavedModel without Keras metadata as a Keras 3 functional model, from data.

Keras 3 ``model.export()``, ``tf.saved_model.save`` and TF-Hub-style
SavedModels carry no layer config, only a serving function. This importer
reads that function as data and rebuilds the computation out of built-in
Keras layers:

1. :mod:`.graph_inline` inlines the signature's function and its callees
   into one flat op graph, variables bound to checkpoint values;
2. everything that does not depend on the signature's inputs is folded in
   numpy (:mod:`.graph_fold`, an allow-list of pure ops);
3. :mod:`.graph_patterns` merges BatchNorm arithmetic, biases and swish;
4. :mod:`.graph_ops` maps each remaining op to a Keras layer (or a
   ``keras.ops`` call) whose weights are the folded constants.

Input layers are named by the signature's input keys and outputs end in
``Identity`` layers named by its output keys (sorted), so the model's
serving signature is the original's. Nothing from the file runs: no
``tf.saved_model.load``, no graph execution. Anything not understood is an
:class:`~secateur.pruner.errors.UnsupportedModelError` naming the op and the
node, raised before any model is returned.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from secateur.pruner._keras import keras
from secateur.pruner.errors import SecateurError, UnsupportedModelError
from secateur.pruner.savedmodel.graph_fold import BATCH_STANDINS, FOLDERS, Sym, tensor_value
from secateur.pruner.savedmodel.graph_inline import (
    CAPTURE,
    FlatGraph,
    Node,
    Ref,
    flatten,
    unsupported,
)
from secateur.pruner.savedmodel.graph_ops import CONVERTERS, is_tensor
from secateur.pruner.savedmodel.graph_patterns import Rewriter
from secateur.pruner.savedmodel.reader import SERVING_KEY, SavedModelFile, ServingSignature

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_COUNTER = re.compile(r"(_\d+)+$")


def import_graph(saved: SavedModelFile, signature_key: str = SERVING_KEY) -> Any:
    """A new Keras 3 functional model computing signature ``signature_key`` of ``saved``.

    Args:
        saved: the parsed SavedModel directory.
        signature_key: the signature to import.

    Returns:
        A ``keras.Model`` whose inputs and outputs carry the signature's keys.

    Raises:
        UnsupportedModelError: an op, pattern or signature the importer does
            not understand (the message names the op type and node).
        ModelLoadError: the checkpoint lacks a variable the graph reads.
    """
    sig = saved.signature(signature_key)
    try:
        flat = flatten(saved, signature_key)
        outputs = [flat.outputs[t.name] for t in sig.outputs]
        importer = _Importer(saved, flat)
        order = topological(flat, outputs)
        importer.fold(order)
        live = [n for n in order if n.name in importer.live]
        Rewriter(flat, importer.values, live, outputs).run()
        return importer.build(topological(flat, outputs), sig)
    except UnsupportedModelError as exc:
        if saved.shown in str(exc):
            raise
        raise UnsupportedModelError(f"{exc} in {saved.shown}") from exc


def topological(flat: FlatGraph, roots: list[Ref]) -> list[Node]:
    """Nodes the outputs ``roots`` depend on, producers first (iterative DFS)."""
    order: list[Node] = []
    state: dict[str, int] = {}
    stack = [(flat.producer(r).name, False) for r in reversed(roots)]
    while stack:
        name, finished = stack.pop()
        if finished:
            state[name] = 2
            order.append(flat.nodes[name])
            continue
        if state.get(name):
            continue
        state[name] = 1
        stack.append((name, True))
        for ref in reversed(flat.nodes[name].inputs):
            src = flat.producer(ref).name
            if state.get(src) == 1:
                raise unsupported(name, flat.nodes[name].op, "the graph has a cycle")
            if not state.get(src):
                stack.append((src, False))
    return order


class _Importer:
    """Folds constants, then converts the live ops of one flat graph to Keras layers."""

    def __init__(self, saved: SavedModelFile, flat: FlatGraph) -> None:
        self.saved, self.flat = saved, flat
        self.values: dict[Ref, Any] = {}
        self.live: set[str] = set()
        self.names: set[str] = set()

    # -- folding ---------------------------------------------------------------

    def fold(self, order: list[Node]) -> None:
        """Evaluate every node that does not depend on an input; mark the others live."""
        for node in order:
            if node.op == "Placeholder" or any(self.ref(r)[0] in self.live for r in node.inputs):
                self.live.add(node.name)
                continue
            args = [self.values[self.ref(r)] for r in node.inputs]
            for i, value in enumerate(self._fold(node, args)):
                self.values[(node.name, i)] = value

    def ref(self, ref: Ref) -> Ref:
        return self.flat.resolve(ref)

    def _fold(self, node: Node, args: list[Any]) -> list[np.ndarray]:
        if node.op == "Const":
            return [tensor_value(node.attr["value"].tensor)]
        if node.op == CAPTURE:
            return [self._captured(node)]
        folder = FOLDERS.get(node.op)
        if folder is None:
            raise unsupported(node.name, node.op, "not a pure op the importer can fold")
        try:
            return [np.asarray(v) for v in folder(node.attr, args)]
        except (ValueError, TypeError, IndexError, KeyError, ArithmeticError) as exc:
            raise unsupported(node.name, node.op, f"folding failed: {exc}") from exc

    def _captured(self, node: Node) -> np.ndarray:
        node_id = int(node.fields["node_id"])
        objects = self.saved.object_graph.nodes
        kind = objects[node_id].WhichOneof("kind") if 0 <= node_id < len(objects) else None
        if kind == "variable":
            return self.saved.variables.value(node_id)
        if kind == "constant":
            op_name = objects[node_id].constant.operation
            for graph_node in self.saved.meta_graph.graph_def.node:
                if graph_node.name == op_name and graph_node.op == "Const":
                    return tensor_value(graph_node.attr["value"].tensor)
        raise UnsupportedModelError(
            "a signature function may capture variables and constants only. "
            f"Received: object-graph node {node_id} of kind {kind!r} in {self.saved.shown}"
        )

    # -- conversion ------------------------------------------------------------

    def build(self, order: list[Node], sig: ServingSignature) -> Any:
        """The Keras model of the live nodes in ``order``."""
        self.names = {t.name for t in sig.inputs} | {t.name for t in sig.outputs}
        inputs = {t.name: _input(t) for t in sig.inputs}
        for node in order:
            if node.name in self.live:
                self._convert(node, inputs)
        outs = []
        for t in sig.outputs:
            value = self.values.get(self.ref(self.flat.outputs[t.name]))
            if not is_tensor(value):
                raise UnsupportedModelError(
                    "every signature output must depend on the signature's inputs. "
                    f"Received: output '{t.name}' is a constant in {self.saved.shown}"
                )
            outs.append(keras.layers.Identity(name=t.name)(value))
        ins = [inputs[t.name] for t in sig.inputs]
        return keras.Model(
            ins[0] if len(ins) == 1 else ins, outs[0] if len(outs) == 1 else outs, name="imported"
        )

    def _convert(self, node: Node, inputs: dict[str, Any]) -> None:
        if node.op == "Placeholder":
            key = node.fields.get("key")
            if key is None:
                raise unsupported(node.name, node.op, "a placeholder outside the signature")
            outs: list[Any] = [inputs[key]]
        elif not any(is_tensor(self.values.get(self.ref(r))) for r in node.inputs):
            outs = self._fold_shapes(node)
        else:
            convert = CONVERTERS.get(node.op)
            if convert is None:
                raise unsupported(node.name, node.op, "no Keras layer is known for this op")
            try:
                outs = convert(self, node)
            except SecateurError:
                raise
            except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
                raise unsupported(node.name, node.op, f"{type(exc).__name__}: {exc}") from exc
        for i, value in enumerate(outs):
            self.values[(node.name, i)] = value

    def _fold_shapes(self, node: Node) -> list[Any]:
        """Shape arithmetic on a batch-dependent :class:`Sym`: folded once per stand-in."""
        folder = FOLDERS.get(node.op)
        if folder is None:
            raise unsupported(node.name, node.op, "not a pure op the importer can fold")
        per_standin = []
        for k in range(len(BATCH_STANDINS)):
            args = [self._standin(self.values[self.ref(r)], k) for r in node.inputs]
            try:
                per_standin.append([np.asarray(v) for v in folder(node.attr, args)])
            except (ValueError, TypeError, IndexError, KeyError, ArithmeticError) as exc:
                raise unsupported(node.name, node.op, f"folding failed: {exc}") from exc
        return [Sym.of(list(pair)) for pair in zip(*per_standin)]

    @staticmethod
    def _standin(value: Any, k: int) -> np.ndarray:
        return value.values[k] if isinstance(value, Sym) else value

    # -- the Context converters use ---------------------------------------------

    def value(self, node: Node, i: int) -> Any:
        ref = self.ref(node.inputs[i])
        if ref not in self.values or self.values[ref] is None:
            raise unsupported(node.name, node.op, f"input {i} is an output the importer lacks")
        return self.values[ref]

    def tensor(self, node: Node, i: int) -> Any:
        value = self.value(node, i)
        if not is_tensor(value):
            raise unsupported(node.name, node.op, f"input {i} must depend on the inputs")
        return value

    def const(self, node: Node, i: int) -> np.ndarray:
        value = self.value(node, i)
        if not isinstance(value, np.ndarray):
            raise unsupported(node.name, node.op, f"input {i} must be a constant")
        return value

    def name(self, node: Node) -> str:
        """A unique layer name from the op's name in its function (``model/conv_1/op``).

        Names go through Keras' own uniquifier, stripped of their ``_<n>``
        counter, so they never collide with the names Keras gives the
        ``keras.ops`` nodes of the same model.
        """
        from keras.src.utils.naming import uniquify

        parts = str(node.fields.get("tf_name", node.name)).split("/")
        base = parts[1] if len(parts) >= 3 else parts[-2] if len(parts) == 2 else parts[0]
        base = _COUNTER.sub("", _NAME_CHARS.sub("_", base).strip("_")) or node.op.lower()
        name = uniquify(base)
        while name in self.names:
            name = uniquify(base)
        self.names.add(name)
        return name


def _input(t: Any) -> Any:
    if not t.shape:
        raise UnsupportedModelError(
            f"a signature input must have a batch axis. Received: input '{t.name}' of shape ()"
        )
    return keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name)


__all__ = ["import_graph"]
