"""tf.keras SavedModels rebuilt from data: weights matched to layers through the object graph."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from secateur.pruner.errors import ModelLoadError, UnsupportedModelError
from secateur.pruner.savedmodel.keras2 import METADATA_PB, read_keras2
from secateur.pruner.savedmodel.reader import SavedModelFile


def _mixed_model():
    """Conv, BN, depthwise, a nested Sequential, an LSTM (weights held by its cell)."""
    import tf_keras

    inp = tf_keras.Input((8, 8, 3), name="pixels")
    x = tf_keras.layers.Conv2D(8, 3, name="c1")(inp)
    x = tf_keras.layers.BatchNormalization(name="bn")(x)
    x = tf_keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = tf_keras.layers.GlobalAveragePooling2D(name="pool")(x)
    inner = tf_keras.Sequential([tf_keras.layers.Dense(4, name="d_in")], name="inner")
    x = tf_keras.layers.Reshape((4, 1), name="seq")(inner(x))
    x = tf_keras.layers.LSTM(3, name="lstm")(x)
    model = tf_keras.Model(inp, tf_keras.layers.Dense(3, name="scores")(x), name="mixed")
    rng = np.random.default_rng(0)
    model.set_weights([rng.uniform(0.5, 1.5, w.shape) for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    model = _mixed_model()
    path = str(tmp_path_factory.mktemp("k2") / "mixed")
    model.compile("sgd", "mse")  # optimizer state and metrics in the file are tf.keras' own
    model.save(path, save_format="tf")
    return model, path


def test_readKeras2_everyWeightFromTheCheckpoint_sameOutputs(saved) -> None:
    model, path = saved
    rebuilt = read_keras2(SavedModelFile(path))
    assert rebuilt.notes == ()  # optimizer, metrics, random generators are not foreign
    for want, got in zip(model.weights, rebuilt.model.weights, strict=True):
        assert want.name == got.name
        np.testing.assert_array_equal(want.numpy(), got.numpy())
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(rebuilt.model(x).numpy(), model(x).numpy())


def test_readKeras2_extraModuleAndVariable_ignoredAndNoted(tmp_path) -> None:
    import tensorflow as tf

    model = _mixed_model()
    model.extra = tf.Module()
    model.get_layer("c1").stray = tf.Variable(np.zeros(3, "float32"), trainable=False)
    path = str(tmp_path / "extra")
    model.save(path, save_format="tf")
    notes = read_keras2(SavedModelFile(path)).notes
    assert any("root.extra" in n and "the model" in n and "tf.Module" in n for n in notes), notes
    assert any(".stray" in n and "layer 'c1'" in n and "variable" in n for n in notes), notes


def _tampered(path: str, edit) -> None:
    """Rewrite the root model config of ``path``'s keras_metadata.pb with ``edit``."""
    from tf_keras.protobuf import saved_metadata_pb2

    pb = os.path.join(path, METADATA_PB)
    proto = saved_metadata_pb2.SavedMetadata()
    with open(pb, "rb") as fh:
        proto.ParseFromString(fh.read())
    root = next(n for n in proto.nodes if n.node_path == "root")
    meta = json.loads(root.metadata)
    layer = next(lay for lay in meta["config"]["layers"] if lay["config"]["name"] == "c1")
    edit(layer["config"])
    root.metadata = json.dumps(meta)
    with open(pb, "wb") as fh:
        fh.write(proto.SerializeToString())


def test_readKeras2_weightOfAnotherShape_refusedNamingTheLayer(tmp_path) -> None:
    import tf_keras

    inp = tf_keras.Input((6, 6, 3), name="x")
    model = tf_keras.Model(inp, tf_keras.layers.Conv2D(4, 3, name="c1")(inp))
    path = str(tmp_path / "m")
    model.save(path, save_format="tf")
    _tampered(path, lambda c: c.update(filters=5))
    with pytest.raises(ModelLoadError, match=r"layer 'c1' weight 'kernel' must be \(3, 3, 3, 5\)"):
        read_keras2(SavedModelFile(path))


def test_readKeras2_missingWeight_refusedNamingTheLayer(tmp_path) -> None:
    import tf_keras

    inp = tf_keras.Input((6, 6, 3), name="x")
    model = tf_keras.Model(inp, tf_keras.layers.Conv2D(4, 3, name="c1", use_bias=False)(inp))
    path = str(tmp_path / "m")
    model.save(path, save_format="tf")
    _tampered(path, lambda c: c.update(use_bias=True))
    with pytest.raises(ModelLoadError, match=r"layer 'c1' has no saved 'bias'"):
        read_keras2(SavedModelFile(path))


def test_readKeras2_subclassedRoot_unsupported(tmp_path) -> None:
    import tensorflow as tf

    path = str(tmp_path / "plain")
    tf.saved_model.save(tf.Module(), path)
    with open(os.path.join(path, METADATA_PB), "wb"):
        pass
    with pytest.raises(UnsupportedModelError, match="no root node"):
        read_keras2(SavedModelFile(path))
