"""Read a SavedModel directory as data: the protobuf and the checkpoint tensors.

``tf.saved_model.load`` restores every trackable object and runs the saved
initializer functions, so a SavedModel could write files or read secrets on
load. Nothing here executes anything from the directory: ``saved_model.pb`` is
parsed as a ``SavedModel`` protobuf, and variable values come from TensorFlow's
checkpoint (tensor bundle) reader.

The SavedModel's object graph (``MetaGraphDef.object_graph_def``) and the
checkpoint's own object graph (the ``_CHECKPOINTABLE_OBJECT_GRAPH`` tensor) list
the same trackable objects under the same node ids, so a variable node of the
former names its checkpoint key through the latter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from secateur.pruner.errors import ModelLoadError, UnsupportedModelError

SAVED_MODEL_PB = "saved_model.pb"
SERVING_KEY = "serving_default"
# A SavedModel proto is bounded by protobuf's own 2 GiB message limit.
MAX_PROTO_BYTES = (2 << 30) - 1
_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


@dataclass(frozen=True)
class TensorSig:
    """One signature entry: key, dtype name and shape (None for unknown)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class ServingSignature:
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]


class SavedModelFile:
    """One SavedModel directory, parsed; variables are read only when asked for.

    Args:
        path: the local SavedModel directory.
        shown: the path to name in errors (the user's URI when ``path`` is a copy).

    Raises:
        ModelLoadError: ``saved_model.pb`` is missing, too large or not a SavedModel.
    """

    def __init__(self, path: str, shown: str | None = None) -> None:
        from google.protobuf.message import DecodeError
        from tensorflow.core.protobuf import saved_model_pb2

        self.path = path
        self.shown = shown or path
        pb = os.path.join(path, SAVED_MODEL_PB)
        try:
            size = os.path.getsize(pb)
            if size > MAX_PROTO_BYTES:
                raise ModelLoadError(
                    f"saved_model.pb must be at most {MAX_PROTO_BYTES} bytes. "
                    f"Received: {size} bytes in {self.shown}"
                )
            with open(pb, "rb") as fh:
                raw = fh.read()
            self.proto = saved_model_pb2.SavedModel()
            self.proto.ParseFromString(raw)
        except (OSError, DecodeError, RecursionError) as exc:
            raise ModelLoadError(
                f"a SavedModel directory must hold a readable saved_model.pb ({exc}). "
                f"Received: {self.shown}"
            ) from exc
        self.meta_graph = self._serve_graph()

    def _serve_graph(self) -> Any:
        graphs = list(self.proto.meta_graphs)
        serve = [g for g in graphs if "serve" in g.meta_info_def.tags]
        if serve:
            return serve[0]
        if len(graphs) == 1:
            return graphs[0]
        raise ModelLoadError(
            "a SavedModel must hold one meta graph or one tagged 'serve'. "
            f"Received: {len(graphs)} meta graphs, tags "
            f"{[list(g.meta_info_def.tags) for g in graphs]} in {self.shown}"
        )

    @property
    def object_graph(self) -> Any:
        """The ``SavedObjectGraph`` proto (empty for TF1-style SavedModels)."""
        return self.meta_graph.object_graph_def

    def signature(self, key: str = SERVING_KEY) -> ServingSignature:
        """The signature ``key``, read from the ``SignatureDef`` (entries sorted by key).

        Raises:
            UnsupportedModelError: the SavedModel has no such signature.
        """
        sigs = self.meta_graph.signature_def
        if key not in sigs:
            raise UnsupportedModelError(
                f"a SavedModel must have a '{key}' signature. "
                f"Received: signatures {sorted(sigs)} in {self.shown}"
            )
        sig = sigs[key]
        return ServingSignature(
            tuple(_tensor_sig(k, sig.inputs[k]) for k in sorted(sig.inputs)),
            tuple(_tensor_sig(k, sig.outputs[k]) for k in sorted(sig.outputs)),
        )

    @cached_property
    def variables(self) -> CheckpointVariables:
        """The checkpoint under ``variables/``, opened on first use."""
        return CheckpointVariables(os.path.join(self.path, "variables", "variables"), self.shown)


def _tensor_sig(key: str, info: Any) -> TensorSig:
    import tensorflow as tf

    shape = info.tensor_shape
    dims: tuple[int | None, ...] = tuple(None if d.size < 0 else int(d.size) for d in shape.dim)
    return TensorSig(key, tf.dtypes.as_dtype(info.dtype).name, dims)


class CheckpointVariables:
    """Variable values of a TF2 checkpoint, addressed by object-graph node id or key.

    Args:
        prefix: the checkpoint prefix (``<dir>/variables/variables``).
        shown: the path to name in errors.

    Raises:
        ModelLoadError: the checkpoint is missing or unreadable.
    """

    def __init__(self, prefix: str, shown: str) -> None:
        import tensorflow as tf
        from tensorflow.core.protobuf import trackable_object_graph_pb2

        self.shown = shown
        try:
            self._reader = tf.train.load_checkpoint(prefix)
            self.graph = trackable_object_graph_pb2.TrackableObjectGraph()
            if self._reader.has_tensor(_GRAPH_KEY):
                self.graph.ParseFromString(self._reader.get_tensor(_GRAPH_KEY))
        except Exception as exc:  # the C++ reader raises several unrelated types
            raise ModelLoadError(
                f"the SavedModel's variables/ must be a readable checkpoint "
                f"({type(exc).__name__}: {exc}). Received: {shown}"
            ) from exc
        self._shapes = self._reader.get_variable_to_shape_map()

    def key(self, node_id: int) -> str | None:
        """The checkpoint key of node ``node_id``'s value; None if it holds none."""
        if not 0 <= node_id < len(self.graph.nodes):
            return None
        for attr in self.graph.nodes[node_id].attributes:
            if attr.checkpoint_key.endswith(_VALUE_SUFFIX):
                return str(attr.checkpoint_key)
        return None

    def has(self, key: str) -> bool:
        return key in self._shapes

    def value(self, node_id: int) -> np.ndarray:
        """The value of the variable at object-graph node ``node_id``.

        Raises:
            ModelLoadError: the node has no value in the checkpoint.
        """
        key = self.key(node_id)
        if key is None or key not in self._shapes:
            raise ModelLoadError(
                f"the SavedModel's object graph names variable node {node_id}, but its "
                f"checkpoint holds no value for it. Received: {self.shown}"
            )
        return self.by_key(key)

    def by_key(self, key: str) -> np.ndarray:
        try:
            return np.asarray(self._reader.get_tensor(key))
        except Exception as exc:  # corrupt shard, CRC mismatch ...
            raise ModelLoadError(
                f"could not read checkpoint tensor '{key}' ({type(exc).__name__}: {exc}). "
                f"Received: {self.shown}"
            ) from exc
