"""Model I/O: every supported input format, the serving export, and bad input."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

from secateur.pruner import PruneSpec, prune
from secateur.pruner.errors import ModelLoadError, UnsupportedModelError
from secateur.pruner.modelio import (
    ARCHIVE_NAME,
    SECATEUR_ASSETS,
    export_serving,
    load_model,
    read_serving_signature,
    signature_of,
)


def _tf_keras_model():
    import tf_keras

    inp = tf_keras.Input((8, 8, 3), name="pixels")
    x = tf_keras.layers.Conv2D(8, 3, name="c1")(inp)
    x = tf_keras.layers.BatchNormalization(name="bn")(x)
    x = tf_keras.layers.ReLU()(x)
    x = tf_keras.layers.Conv2D(6, 3, name="c2")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inp, tf_keras.layers.Dense(3, name="scores")(x))


def test_loadModel_keras2SavedModel_sameOutputsInKeras3(tmp_path) -> None:
    legacy = _tf_keras_model()
    rng = np.random.default_rng(0)
    bn = legacy.layers[2]
    bn.set_weights([rng.uniform(0.5, 1.5, w.shape) for w in bn.get_weights()])
    path = str(tmp_path / "k2")
    legacy.save(path, save_format="tf")
    assert os.path.exists(os.path.join(path, "keras_metadata.pb"))
    model = load_model(path)
    assert isinstance(model, keras.Model)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x)), legacy(x).numpy(), atol=1e-5)
    # ... and the pruned model, exported, keeps the original serving signature.
    result = prune(model, PruneSpec(ratio=0.5))
    out = str(tmp_path / "served")
    export_serving(result.model, out)
    assert read_serving_signature(out) == read_serving_signature(path)


def test_exportServing_signatureKeysMatchModelNames_notKerasDefaults(tmp_path) -> None:
    inp = keras.Input((6, 6, 3), name="image")
    extra = keras.Input((2,), name="meta")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inp))
    x = keras.layers.Concatenate()([x, extra])
    model = keras.Model([inp, extra], keras.layers.Dense(5, name="probs")(x))
    out = str(tmp_path / "v")
    written = export_serving(model, out)
    sig = read_serving_signature(out)
    assert [t.name for t in sig.inputs] == ["image", "meta"]
    assert [t.name for t in sig.outputs] == ["probs"]
    assert written == signature_of(model)
    import tensorflow as tf

    served = tf.saved_model.load(out).signatures["serving_default"]
    xs = {"image": tf.ones((2, 6, 6, 3)), "meta": tf.ones((2, 2))}
    np.testing.assert_allclose(
        served(**xs)["probs"].numpy(), np.asarray(model([xs["image"], xs["meta"]])), atol=1e-5
    )


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_loadModel_kerasAndH5Files(tmp_path, suffix) -> None:
    inp = keras.Input((4, 4, 2), name="x")
    model = keras.Model(inp, keras.layers.Conv2D(3, 1, name="c")(inp))
    path = str(tmp_path / f"m{suffix}")
    model.save(path)
    loaded = load_model(path)
    x = np.ones((1, 4, 4, 2), "float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


def test_loadModel_secateurOutputVersion_loadsTheArchive(tmp_path) -> None:
    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, keras.layers.Dense(2, name="d")(inp))
    assets = tmp_path / "1" / SECATEUR_ASSETS
    assets.mkdir(parents=True)
    model.save(str(assets / ARCHIVE_NAME))
    assert load_model(str(tmp_path / "1")).get_layer("d").units == 2


def test_loadModel_savedModelWithoutKerasMetadata_importedFromItsServingGraph(tmp_path) -> None:
    import tensorflow as tf

    class Plain(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 2), name="x")])
        def __call__(self, x):
            return {"doubled": x * 2}

    path = str(tmp_path / "plain")
    tf.saved_model.save(Plain(), path)
    model = load_model(path)
    x = np.array([[1.0, -2.0], [0.5, 3.0]], "float32")
    np.testing.assert_array_equal(np.asarray(model(x)), x * 2)
    assert signature_of(model) == read_serving_signature(path)


def test_loadModel_savedModelWithoutKerasModelOrSignature_refused(tmp_path) -> None:
    import tensorflow as tf

    path = str(tmp_path / "module")
    tf.saved_model.save(tf.Module(), path)
    with pytest.raises(UnsupportedModelError, match="must have a 'serving_default' signature"):
        load_model(path)
    with open(os.path.join(path, "keras_metadata.pb"), "wb"):  # empty: describes no model
        pass
    with pytest.raises(UnsupportedModelError, match="must have a 'serving_default' signature"):
        load_model(path)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("m.keras", b"not a zip", "corrupt"),
        ("m.h5", b"garbage", "could not read"),
        ("m.onnx", b"x", "must end in"),
    ],
)
def test_loadModel_badFiles_raiseModelLoadError(tmp_path, name, content, match) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=match):
        load_model(str(path))


def test_loadModel_missingPathOrEmptyDir(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="must exist"):
        load_model(str(tmp_path / "nope.keras"))
    with pytest.raises(ModelLoadError, match=r"saved_model\.pb"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("save_format", ["tf", "h5"])
def test_loadModel_tfKerasDepthwiseConvAndSlashNames_sameOutputsInKeras3(
    tmp_path, save_format
) -> None:
    # tf.keras writes groups=1 into DepthwiseConv2D configs and allows "/" in
    # layer names (DenseNet's conv1/conv); Keras 3 refuses both.
    import tf_keras

    inp = tf_keras.Input((8, 8, 3), name="pixels")
    x = tf_keras.layers.DepthwiseConv2D(3, padding="same", name="block/dw")(inp)
    x = tf_keras.layers.Conv2D(4, 1, name="block/pw")(x)
    x = tf_keras.layers.Conv2D(4, 1, name="block_pw")(x)  # the name "/" -> "_" would take
    legacy = tf_keras.Model(inp, tf_keras.layers.GlobalAveragePooling2D()(x))
    path = str(tmp_path / ("k2.h5" if save_format == "h5" else "k2"))
    legacy.save(path, save_format=save_format)
    before = os.path.getmtime(path)
    model = load_model(path)
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x)), legacy(x).numpy(), atol=1e-6)
    assert os.path.getmtime(path) == before  # the user's file is never rewritten
