"""tf.keras / Keras 2 SavedModels rebuilt from data: metadata config, checkpoint weights.

``tf_keras.models.load_model`` restores every trackable object in
``saved_model.pb`` and runs its saved initializer functions, whatever
``keras_metadata.pb`` says. Here nothing from the directory runs:

1. the model config is the root node's entry in ``keras_metadata.pb`` (checked
   by :func:`secateur.pruner.safety.check_model_file` before this is called),
   and ``tf_keras`` constructs the layers it names (built-in classes only);
2. each layer's weights are read with the checkpoint reader, found through the
   SavedModel's object graph: the object-graph nodes that are tf.keras layers
   are the ``keras_metadata.pb`` nodes with the same id (each names its layer),
   and a layer node's variable children are its weights by attribute name
   (``kernel``, ``gamma``, ``moving_mean`` ...); weights held by inner objects
   (an RNN cell, an attention layer's projections) are taken from the layer's
   ordered ``variables`` list, their names checked the same way;
3. any other object hanging off the model or a layer (a ``tf.Module``, a
   resource with saved initializers, a stray variable) is ignored and reported
   in :attr:`Keras2Model.notes` by its path in the object graph.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from secateur.pruner.errors import ModelLoadError, UnsupportedModelError
from secateur.pruner.savedmodel.reader import SavedModelFile

METADATA_PB = "keras_metadata.pb"
_MODEL_IDS = ("_tf_keras_network", "_tf_keras_sequential", "_tf_keras_model")
# Children tf.keras writes for every layer: bookkeeping lists, its API object,
# its traced call functions; none of them holds a weight of its own.
_KERAS_CHILDREN = frozenset({
    "variables", "trainable_variables", "non_trainable_variables", "regularization_losses",
    "keras_api", "layers", "metrics", "layer_regularization_losses", "layer_metrics",
    "signatures", "_default_save_signature",
})  # fmt: skip
# tf.keras' own helpers (the optimizer's state, a layer's random generator):
# searched only for resources and assets, which tf.keras never puts there.
_KERAS_INTERNAL = frozenset({"optimizer", "_random_generator"})
_WRAPPERS = ("trackable_list_wrapper", "trackable_dict_wrapper", "trackable_tuple_wrapper")
_DESCRIBED = {
    "_generic_user_object": "a tf.Module or other trackable object",
    "resource": "a resource (its saved create/initialize functions)",
    "asset": "an asset file",
    "variable": "a variable that is no layer's weight",
}
_IGNORED_KINDS = ("function", "bare_concrete_function")


@dataclass(frozen=True)
class Keras2Model:
    """A tf.keras model rebuilt from a SavedModel's data.

    Attributes:
        model: the ``tf_keras.Model``, its weights set from the checkpoint.
        notes: one line per object in the file that is not part of the Keras
            model and was ignored (named by its object-graph path).
    """

    model: Any
    notes: tuple[str, ...]


@dataclass(frozen=True)
class _Node:
    """One ``keras_metadata.pb`` node: a tf.keras object at an object-graph node."""

    path: str
    identifier: str
    name: str
    meta: dict[str, Any]


def read_metadata(path: str, shown: str) -> dict[int, _Node]:
    """The ``keras_metadata.pb`` nodes of the SavedModel at ``path``, by object-graph node id.

    Raises:
        ModelLoadError: the file is unreadable or a node's metadata is not JSON.
    """
    from google.protobuf.message import DecodeError
    from tf_keras.protobuf import saved_metadata_pb2

    proto = saved_metadata_pb2.SavedMetadata()
    try:
        with open(os.path.join(path, METADATA_PB), "rb") as fh:
            proto.ParseFromString(fh.read())
        nodes = {}
        for node in proto.nodes:
            meta = json.loads(node.metadata or "{}", object_hook=_plain_values)
            name = meta.get("name") if isinstance(meta, dict) else None
            nodes[int(node.node_id)] = _Node(
                str(node.node_path), str(node.identifier), str(name or ""), meta
            )
    except (OSError, DecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(
            f"keras_metadata.pb must be a readable SavedMetadata proto with JSON metadata "
            f"({type(exc).__name__}: {exc}). Received: {shown}"
        ) from exc
    return nodes


def has_keras_model(meta: dict[int, _Node]) -> bool:
    """Whether metadata from :func:`read_metadata` describes a model at the SavedModel's root."""
    root = meta.get(0)
    return root is not None and root.path == "root"


def read_keras2(saved: SavedModelFile, meta: dict[int, _Node] | None = None) -> Keras2Model:
    """Rebuild the tf.keras model of ``saved`` from its metadata and checkpoint.

    Args:
        saved: the parsed SavedModel; its ``keras_metadata.pb`` must already
            have passed :func:`secateur.pruner.safety.check_model_file`.
        meta: its metadata from :func:`read_metadata`, when the caller has
            read it already (read here otherwise).

    Returns:
        The model with its weights, and notes on the objects that were ignored.

    Raises:
        UnsupportedModelError: the root is not a functional or Sequential model.
        ModelLoadError: a layer's weight is missing from the checkpoint or has
            another shape than the layer built from the config.
    """
    if meta is None:
        meta = read_metadata(saved.path, saved.shown)
    model = _build(meta.get(0), saved.shown)
    matcher = _Matcher(saved, meta)
    matcher.assign_model(model, 0, "root")
    return Keras2Model(model, tuple(matcher.notes()))


def _build(root: _Node | None, shown: str) -> Any:
    if root is None or root.path != "root" or root.identifier not in _MODEL_IDS:
        found = f"a '{root.identifier}' at the root" if root else "no root node"
        raise UnsupportedModelError(
            "a tf.keras SavedModel must describe a functional or Sequential model in "
            f"keras_metadata.pb. Received: {found} in {shown}"
        )
    import tf_keras

    config = {"class_name": root.meta.get("class_name"), "config": root.meta.get("config")}
    try:
        model = tf_keras.models.model_from_config(config)
    except Exception as exc:  # tf_keras raises many types for a config it cannot use
        raise ModelLoadError(
            f"tf_keras could not build the model from keras_metadata.pb's config "
            f"({type(exc).__name__}: {exc}). Received: {shown}"
        ) from exc
    if not isinstance(model, tf_keras.Model) or not model.built:
        raise UnsupportedModelError(
            "only functional or Sequential tf.keras models with known input shapes can be "
            f"converted. Received: {type(model).__name__} from {shown}"
        )
    return model


class _Matcher:
    """Sets built layers' weights from the checkpoint; remembers which nodes it used."""

    def __init__(self, saved: SavedModelFile, meta: dict[int, _Node]) -> None:
        self.saved, self.meta = saved, meta
        self.nodes = saved.object_graph.nodes
        self.used: set[int] = set()

    def _kind(self, node_id: int) -> str:
        return str(self.nodes[node_id].WhichOneof("kind"))

    def _children(self, node_id: int) -> list[tuple[str, int]]:
        if not 0 <= node_id < len(self.nodes):
            raise ModelLoadError(
                f"the SavedModel's object graph must hold every node keras_metadata.pb "
                f"names; node {node_id} is missing. Received: {self.saved.shown}"
            )
        return [(str(c.local_name), int(c.node_id)) for c in self.nodes[node_id].children]

    def assign_model(self, model: Any, node_id: int, path: str) -> None:
        import tf_keras

        by_name = {
            self.meta[child].name: child
            for local, child in self._children(node_id)
            if local.startswith("layer-") and child in self.meta
        }
        for layer in model.layers:
            child = by_name.get(layer.name)
            where = f"{path}/{layer.name}" if path != "root" else layer.name
            if child is None:
                if layer.weights:
                    raise ModelLoadError(
                        f"every layer with weights must be in the SavedModel's object graph; "
                        f"layer '{where}' is not. Received: {self.saved.shown}"
                    )
                continue
            if isinstance(layer, tf_keras.Model):
                self.assign_model(layer, child, where)
            else:
                self._assign_layer(layer, child, where)

    def _assign_layer(self, layer: Any, node_id: int, where: str) -> None:
        children = self._children(node_id)
        direct = {n: c for n, c in children if self._kind(c) == "variable"}
        ordered = self._listed(dict(children).get("variables"))
        values = []
        for i, weight in enumerate(layer.weights):
            attr = _short(weight.name)
            var = direct.get(attr)
            if var is None and i < len(ordered) and self._var_name(ordered[i]) == attr:
                var = ordered[i]
            if var is None:
                raise ModelLoadError(
                    f"every weight of a layer must be saved in the checkpoint; layer '{where}' "
                    f"has no saved '{attr}'. Received: {self.saved.shown}"
                )
            value = self.saved.variables.value(var)
            if tuple(value.shape) != tuple(weight.shape):
                raise ModelLoadError(
                    f"a saved weight must have the shape of the layer built from the config; "
                    f"layer '{where}' weight '{attr}' must be {tuple(weight.shape)}. "
                    f"Received: {tuple(value.shape)} in {self.saved.shown}"
                )
            values.append(np.asarray(value, dtype=weight.dtype.as_numpy_dtype))
            self.used.add(var)
        layer.set_weights(values)

    def _listed(self, node_id: int | None) -> list[int]:
        """The node ids a list wrapper holds, in list order."""
        if node_id is None:
            return []
        items = [(int(n), c) for n, c in self._children(node_id) if n.isdigit()]
        return [c for _, c in sorted(items)]

    def _var_name(self, node_id: int) -> str:
        node = self.nodes[node_id]
        return _short(node.variable.name) if self._kind(node_id) == "variable" else ""

    def notes(self) -> list[str]:
        """One line per object under a Keras layer or model that is not part of the model."""
        notes: list[str] = []
        for node_id, node in sorted(self.meta.items()):
            if node.identifier == "_tf_keras_metric" or not 0 <= node_id < len(self.nodes):
                continue
            found: list[tuple[str, str]] = []
            self._extras(node_id, node.path, found, set(), strict=True)
            owner = "the model" if node_id == 0 else f"layer '{node.name}'"
            notes += [
                f"ignored {what} at '{path}' (on {owner}) in {self.saved.shown}: it is not "
                "part of the Keras model, so nothing of it was read or run"
                for path, what in found
            ]
        return notes

    def _extras(
        self, node_id: int, path: str, found: list[tuple[str, str]], seen: set[int], strict: bool
    ) -> None:
        """Collect foreign objects under ``node_id``; not ``strict``: resources and assets only."""
        for local, child in self._children(node_id):
            if child in seen or child in self.meta or local in _KERAS_CHILDREN:
                continue
            if local.startswith(("layer-", "layer_with_weights-")):
                continue
            seen.add(child)
            kind, where = self._kind(child), f"{path}.{local}"
            if kind in _IGNORED_KINDS or (kind == "variable" and child in self.used):
                continue
            ident = self.nodes[child].user_object.identifier if kind == "user_object" else ""
            if ident in _WRAPPERS or local in _KERAS_INTERNAL:
                self._extras(child, where, found, seen, strict and local not in _KERAS_INTERNAL)
            elif strict or kind in ("resource", "asset"):
                found.append((where, _DESCRIBED.get(ident or kind, f"a '{ident or kind}' object")))


def _plain_values(obj: dict[str, Any]) -> Any:
    """Undo tf.keras' JSON encoding of plain values (tuples, shapes, bytes); nothing else.

    tf.keras' own decoder also revives type specs and composite tensors by
    registry lookup; configs of built-in layers need only these values.
    """
    cls = obj.get("class_name")
    if cls in ("__tuple__", "TensorShape") and isinstance(obj.get("items"), list):
        return tuple(obj["items"])
    if cls == "__ellipsis__":
        return Ellipsis
    if cls == "__bytes__" and isinstance(obj.get("value"), str):
        return obj["value"].encode("utf-8")
    return obj


def _short(name: str) -> str:
    """A weight's attribute name from its full name (``block/conv/kernel:0`` -> ``kernel``)."""
    return name.split(":")[0].rsplit("/", 1)[-1]
