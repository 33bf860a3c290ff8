"""Read models from local files as data, and write TF Serving SavedModels.

Reading (``load_model``), each format turned into a Keras 3 model without
running anything from the file:

- ``.keras`` archives (Keras 3) and ``.h5`` files: the config is checked by
  :mod:`secateur.pruner.safety` (Lambda layers, serialised functions and
  custom objects raise :class:`UnsafeModelError`; classes registered by
  packages the operator trusts pass), then Keras loads with ``safe_mode=True``;
- tf.keras / Keras 2 SavedModels (``keras_metadata.pb`` describing a model):
  the metadata is checked the same way, ``tf_keras`` builds the layers from
  its config and every weight is read with the checkpoint reader, matched to
  its layer through the object graph in ``saved_model.pb``
  (:mod:`.savedmodel.keras2`); other objects in the file are ignored and
  logged. The model is carried into Keras 3 through the legacy HDF5 format
  both understand, so the weights are the same;
- SavedModels without Keras metadata (Keras 3 ``model.export()``,
  ``tf.saved_model.save``, TF-Hub-style): the ``serving_default`` function is
  read from the MetaGraphDef and its ops mapped to Keras layers, weights from
  the checkpoint (:mod:`.savedmodel.graph_import`); an op it does not know
  raises :class:`UnsupportedModelError` naming the op and node;
- a Secateur output version (``<version>/assets.extra/secateur/model.keras``).

``tf.saved_model.load`` and ``tf_keras.models.load_model`` are never called
on a user's file: both restore every object in ``saved_model.pb`` and run its
saved initializer functions (a test keeps them out of the source).

Writing (``export_serving``): a SavedModel whose ``serving_default`` signature
has the same input and output keys, dtypes and shapes as the original model
(Keras 3's plain ``export()`` would rename them ``keras_tensor``/``output_0``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from typing import Any

from secateur.pruner._keras import keras
from secateur.pruner.errors import ModelLoadError
from secateur.pruner.safety import check_model_file, trusted_objects
from secateur.pruner.savedmodel.graph_import import import_graph
from secateur.pruner.savedmodel.keras2 import (
    METADATA_PB,
    has_keras_model,
    read_keras2,
    read_metadata,
)
from secateur.pruner.savedmodel.reader import (
    SAVED_MODEL_PB,
    SavedModelFile,
    ServingSignature,
    TensorSig,
)

_log = logging.getLogger(__name__)
SECATEUR_ASSETS = os.path.join("assets.extra", "secateur")
ARCHIVE_NAME = "model.keras"


def load_model(path: str, trusted: Sequence[str] = ()) -> Any:
    """Load a Keras 3 model from a local file or directory.

    Args:
        path: a ``.keras``/``.h5`` file, a SavedModel directory (tf.keras, or
            any with a ``serving_default`` signature) or a Secateur output
            version directory.
        trusted: installed packages (``keras_hub``) whose registered classes
            the file may name (``--trust-package``; see ``safety``).

    Returns:
        An uncompiled ``keras.Model``.

    Raises:
        ModelLoadError: the path is missing, unreadable or corrupt.
        UnsupportedModelError: a SavedModel whose serving graph holds an op or
            pattern the importer does not know (named), or that has neither a
            Keras model nor a ``serving_default`` signature.
        UnsafeModelError: loading would run code from the file (Lambda layers,
            custom objects); checked before anything is deserialised.
    """
    if not os.path.exists(path):
        raise ModelLoadError(f"model path must exist. Received: {path}")
    if os.path.isdir(path):
        return _load_directory(path, trusted)
    return _load_file(path, path, trusted)


def _load_file(path: str, shown: str, trusted: Sequence[str] = ()) -> Any:
    """Load a ``.keras``/``.h5`` file; errors name ``shown``, the user's path."""
    lower = path.lower()
    if lower.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"a .keras file must be a zip archive; this one is corrupt. Received: {shown}"
        )
    if not lower.endswith((".keras", ".h5", ".hdf5")):
        raise ModelLoadError(
            f"model files must end in .keras, .h5 or be a SavedModel directory. Received: {shown}"
        )
    check_model_file(path, shown, trusted)
    with tempfile.TemporaryDirectory(prefix="secateur-h5-") as tmp:
        if not lower.endswith(".keras"):
            path = _keras3_h5(path, tmp)
        try:
            return keras.saving.load_model(
                path, custom_objects=trusted_objects(trusted), compile=False, safe_mode=True
            )
        except Exception as exc:
            raise ModelLoadError(
                f"could not read the model ({type(exc).__name__}: {exc}). Received: {shown}"
            ) from exc


def _keras3_h5(path: str, tmp: str) -> str:
    """``path``, or a copy in ``tmp`` whose config Keras 3 accepts.

    Two things tf.keras writes that Keras 3 refuses: ``groups`` in
    DepthwiseConv2D configs (a Conv subclass there; the key always holds 1 and
    means nothing for a depthwise conv, so it is dropped), and layer names
    holding ``/`` (keras.applications' DenseNet: ``conv1/conv``), renamed with
    ``_`` everywhere the config names them. Legacy HDF5 weights are matched to
    layers by order, not name, so the weights still land where they belong.
    """
    import h5py

    with h5py.File(path, "r") as f:
        raw = f.attrs.get("model_config")
    if raw is None:
        return path  # check_model_file already refused it; keep Keras' own error
    config = json.loads(raw)
    dropped = _drop_depthwise_groups(config)
    renames = _slash_free_names(config)
    if not dropped and not renames:
        return path
    config = _renamed(config, renames)
    copy = os.path.join(tmp, "model.h5")
    shutil.copyfile(path, copy)
    with h5py.File(copy, "r+") as f:
        f.attrs["model_config"] = json.dumps(config)
    return copy


def _slash_free_names(config: Any) -> dict[str, str]:
    """Old -> new name for every layer name under ``config`` that holds ``/``."""
    names: set[str] = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            inner = node.get("config")
            if isinstance(inner, dict) and isinstance(inner.get("layers"), list):
                for layer in inner["layers"]:
                    name = layer.get("config", {}).get("name") if isinstance(layer, dict) else None
                    if isinstance(name, str):
                        names.add(name)
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(config)
    renames: dict[str, str] = {}
    for name in sorted(n for n in names if "/" in n):
        new = name.replace("/", "_")
        while new in names or new in renames.values():
            new += "_"
        renames[name] = new
    return renames


def _renamed(node: Any, renames: dict[str, str]) -> Any:
    """``node`` with every string equal to a renamed layer name replaced."""
    if isinstance(node, dict):
        return {k: _renamed(v, renames) for k, v in node.items()}
    if isinstance(node, list):
        return [_renamed(v, renames) for v in node]
    return renames.get(node, node) if isinstance(node, str) else node


def _drop_depthwise_groups(node: Any) -> bool:
    """Remove ``groups`` from every DepthwiseConv2D config under ``node``; True if any."""
    found = False
    if isinstance(node, dict):
        config = node.get("config")
        if node.get("class_name") == "DepthwiseConv2D" and isinstance(config, dict):
            found = config.pop("groups", None) is not None
        for value in node.values():
            found = _drop_depthwise_groups(value) or found
    elif isinstance(node, list):
        for value in node:
            found = _drop_depthwise_groups(value) or found
    return found


def _load_directory(path: str, trusted: Sequence[str] = ()) -> Any:
    ours = os.path.join(path, SECATEUR_ASSETS, ARCHIVE_NAME)
    if os.path.exists(ours):
        return load_model(ours, trusted)
    if not os.path.exists(os.path.join(path, SAVED_MODEL_PB)):
        raise ModelLoadError(
            "a model directory must hold saved_model.pb (a SavedModel), or a Secateur "
            f"output ({SECATEUR_ASSETS}/{ARCHIVE_NAME}). Received: {path}"
        )
    saved = SavedModelFile(path)
    if os.path.exists(os.path.join(path, METADATA_PB)):
        check_model_file(path, path, trusted)  # before anything of the config is used
        meta = read_metadata(path, path)  # read once: it also drives the rebuild
        if has_keras_model(meta):
            return _load_tf_keras_savedmodel(saved, meta)
    return import_graph(saved)  # no Keras model described: the serving function, as data


def _load_tf_keras_savedmodel(saved: SavedModelFile, meta: Any) -> Any:
    """A tf.keras SavedModel rebuilt from its data, carried into Keras 3 through HDF5."""
    legacy = read_keras2(saved, meta)
    for note in legacy.notes:
        _log.warning("%s", note)
    with tempfile.TemporaryDirectory(prefix="secateur-h5-") as tmp:
        h5 = os.path.join(tmp, "model.h5")
        legacy.model.save(h5, save_format="h5")
        return _load_file(h5, saved.shown)


def signature_of(model: Any) -> ServingSignature:
    """The serving signature Secateur writes for ``model``.

    Input keys are the model's input layer names, output keys its output
    layer names: what tf.keras wrote for Keras 2 SavedModels, so a pruned
    model is a drop-in replacement for clients of the original.
    """
    ins = tuple(
        TensorSig(t._keras_history[0].name, str(t.dtype), tuple(t.shape)) for t in model.inputs
    )
    outs = tuple(
        TensorSig(t._keras_history[0].name, str(t.dtype), tuple(t.shape)) for t in model.outputs
    )
    return ServingSignature(ins, outs)


def export_serving(model: Any, out_dir: str) -> ServingSignature:
    """Write ``model`` as a TF Serving SavedModel into ``out_dir``.

    Args:
        model: the Keras 3 model.
        out_dir: a directory that must not exist yet (the version directory).

    Returns:
        The ``serving_default`` signature written.
    """
    import tensorflow as tf

    sig = signature_of(model)
    specs = [tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in sig.inputs]
    out_names = [t.name for t in sig.outputs]
    single_input = len(specs) == 1

    def serve(*args: Any) -> dict[str, Any]:
        outputs = model(args[0] if single_input else list(args), training=False)
        flat = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return dict(zip(out_names, flat, strict=True))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve, input_signature=specs)
    archive.write_out(out_dir, verbose=False)
    return sig


def read_serving_signature(saved_model_dir: str) -> ServingSignature:
    """The ``serving_default`` signature of any SavedModel on disk, read from its protobuf.

    Nothing in the directory runs (no ``tf.saved_model.load``).
    """
    return SavedModelFile(saved_model_dir).signature()
