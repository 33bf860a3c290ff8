"""No code from a model file runs: every format is inspected before loading.

Each hostile file writes a marker file if any of its code runs; the tests
assert the typed error, the layer it names, and that no marker appears.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import zipfile
from typing import Any

import keras
import numpy as np
import pytest

from secateur.pruner.errors import ModelLoadError, UnsafeModelError
from secateur.pruner.modelio import ARCHIVE_NAME, SECATEUR_ASSETS, load_model

from .. import hostile_models as hm

# case -> (offending layer path, what the message names as refused)
EXPECTED = {
    "keras_lambda": ("m/evil", "Lambda"),
    "keras_nested_lambda": ("m/td/inner/evil", "Lambda"),
    "keras_custom_layer": ("m/custom", "MarkerLayer"),
    "keras_custom_activation": ("m/act", "secateur_test>marker_activation"),
    "keras_h5_lambda": ("m/evil", "Lambda"),
    "tf_keras_h5_lambda": ("m/inner/evil", "Lambda"),
    "tf_keras_savedmodel_lambda": ("m/inner/evil", "Lambda"),
    "tf_keras_savedmodel_custom": ("m/custom", "TfMarkerLayer"),
    "secateur_version_lambda": ("m/evil", "Lambda"),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """case -> (model path, marker path); built once, markers removed after saving."""
    d = tmp_path_factory.mktemp("hostile")
    m = {case: str(d / f"{case}.marker") for case in EXPECTED}
    version = d / "version" / "1"
    (version / SECATEUR_ASSETS).mkdir(parents=True)
    paths = {
        "keras_lambda": hm.keras_lambda(str(d / "l.keras"), m["keras_lambda"]),
        "keras_nested_lambda": hm.keras_lambda(
            str(d / "n.keras"), m["keras_nested_lambda"], nested=True
        ),
        "keras_custom_layer": hm.keras_custom_layer(str(d / "c.keras"), m["keras_custom_layer"]),
        "keras_custom_activation": hm.keras_custom_activation(
            str(d / "a.keras"), m["keras_custom_activation"]
        ),
        "keras_h5_lambda": hm.keras_lambda(str(d / "l.h5"), m["keras_h5_lambda"]),
        "tf_keras_h5_lambda": hm.tf_keras_lambda(str(d / "t.h5"), m["tf_keras_h5_lambda"], "h5"),
        "tf_keras_savedmodel_lambda": hm.tf_keras_lambda(
            str(d / "tsm"), m["tf_keras_savedmodel_lambda"], "tf"
        ),
        "tf_keras_savedmodel_custom": hm.tf_keras_custom_layer(
            str(d / "tsmc"), m["tf_keras_savedmodel_custom"]
        ),
    }
    hm.keras_lambda(str(version / SECATEUR_ASSETS / ARCHIVE_NAME), m["secateur_version_lambda"])
    paths["secateur_version_lambda"] = str(version)
    assert not any(os.path.exists(p) for p in m.values())
    return {case: (paths[case], m[case]) for case in EXPECTED}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_loadModel_hostileFile_refusedBeforeAnyCodeRuns(hostile, case) -> None:
    path, marker = hostile[case]
    layer, refused = EXPECTED[case]
    with pytest.raises(UnsafeModelError) as info:
        load_model(path)
    assert not os.path.exists(marker)
    message = str(info.value)
    assert info.value.layer == layer and f"layer '{layer}'" in message
    assert refused in message and refused in info.value.class_name
    assert "Received: " + path in message


def _layer(cls: str, module: str | None = "keras.layers", **config: Any) -> dict[str, Any]:
    obj = {"class_name": cls, "config": {"name": "bad", "trainable": True, **config}}
    return obj | ({"module": module, "registered_name": None} if module else {}) | {"name": "bad"}


_GET_FILE = {"module": "keras.utils", "class_name": "function", "config": "get_file"}
_BYTECODE = {"class_name": "__lambda__", "config": {"code": "4wEAAAAA", "defaults": None}}


@pytest.mark.parametrize(
    "layer,match",
    [
        (_layer("Popen", module="subprocess"), "from module 'subprocess', not from Keras"),
        (_layer("Dense", units=2, activation=_GET_FILE), "'get_file' from module 'keras.utils'"),
        (_layer("TFSMLayer", filepath="/elsewhere"), "loads another SavedModel"),
        (_layer("TorchModuleWrapper", module="keras.layers"), "unpickles"),
        (_layer("Dense", units=2, kernel_initializer=_BYTECODE), "Python bytecode"),
        (_layer("Dense", units=2, function_type="lambda", function=["4wE", None]), "bytecode"),
        (_layer("Evil", module=None), "not a built-in Keras class"),
        (_layer("Thing") | {"registered_name": "pkg>Thing"}, "registered as 'pkg>Thing'"),
        (_layer("TimeDistributed", layer=_layer("Lambda")), "Python function stored"),
        (_layer("Dense", units=2, compile_config=_BYTECODE), "Python bytecode"),
    ],
    ids=[
        "moduleOutsideKeras",
        "nonModelingKerasFunction",
        "TFSMLayer",
        "TorchModuleWrapper",
        "bytecodeInInitializer",
        "legacyLambdaFunctionType",
        "unknownClass",
        "registeredCustomObject",
        "lambdaInsideWrapper",
        "compileConfigBelowTheRoot",
    ],
)
def test_loadModel_handcraftedConfig_refusedFromConfigAlone(tmp_path, layer, match) -> None:
    """Any depth, any kind of object: refused from config.json, before Keras reads anything."""
    with pytest.raises(UnsafeModelError, match=match):
        load_model(hm.config_archive(str(tmp_path / "m.keras"), [layer]))


def test_loadModel_configNestedTooDeeply_modelLoadErrorNotACrash(tmp_path) -> None:
    path = tmp_path / "deep.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelLoadError, match=r"nested too deeply|must be JSON") as info:
        load_model(str(path))
    assert not isinstance(info.value, UnsafeModelError)


def _wrapped_keras_model() -> Any:
    inp = keras.Input((3, 4), name="x")
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, activation="gelu")], name="inner"
    )
    x = keras.layers.TimeDistributed(inner, name="td")(inp)
    x = keras.layers.Bidirectional(keras.layers.LSTM(2), name="bi")(x)
    return keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="out")(x))


def _wrapped_tf_keras_model() -> Any:
    import tf_keras

    inp = tf_keras.Input((3, 4), name="x")
    inner = tf_keras.Sequential([tf_keras.layers.Dense(4, activation="swish")], name="inner")
    x = tf_keras.layers.TimeDistributed(inner, name="td")(inp)
    x = tf_keras.layers.BatchNormalization(name="bn")(tf_keras.layers.Flatten()(x))
    model = tf_keras.Model(inp, tf_keras.layers.Dense(2, name="out")(x))
    model.compile("adam", "mse", metrics=["mae"])  # training_config is in the file too
    return model


@pytest.mark.parametrize("fmt", ["keras", "h5", "tf_keras_h5", "tf_keras_savedmodel"])
def test_loadModel_builtinWrappersAndNesting_stillLoad(tmp_path, fmt) -> None:
    if fmt.startswith("tf_keras"):
        model = _wrapped_tf_keras_model()
        path = str(tmp_path / ("m.h5" if fmt.endswith("h5") else "sm"))
        model.save(path, save_format="h5" if fmt.endswith("h5") else "tf")
    else:
        model = _wrapped_keras_model()
        path = str(tmp_path / f"m.{fmt}")
        model.save(path)
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype("float32")
    loaded = load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-5)


def test_hostileFiles_runTheirCode_withoutTheCheck(hostile, tmp_path) -> None:
    """Controls: the fixtures are real threats. tf_keras runs a SavedModel's Lambda,
    and Keras 3's safe_mode does not stop a registered custom class."""
    import tf_keras

    path, marker = hostile["tf_keras_savedmodel_lambda"]
    copy = shutil.copytree(path, tmp_path / "copy")
    try:
        with contextlib.suppress(Exception):
            tf_keras.models.load_model(copy, compile=False)
        assert os.path.exists(marker)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker)
    path, marker = hostile["keras_custom_layer"]
    try:
        keras.saving.load_model(path, compile=False, safe_mode=True)
        assert os.path.exists(marker)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker)
