"""Model files that run code when loaded, for the model-safety tests.

Each writes ``marker`` if any of its code runs. Lambdas are built from source
with the marker path as a literal, so their bytecode works in any process (a
server's worker included), not only where this module is imported. Custom
classes carry the path in their config and are registered here, so a loader
in this process *would* find and run them: refusing them is the loader's job.
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from typing import Any

import keras

_ACTIVATION_MARKER: dict[str, str] = {}


def evil_lambda_fn(marker: str) -> Any:
    """``lambda x: (open(marker, 'w').write('x'), x)[1]`` with ``marker`` inlined."""
    return eval(f"lambda x: (open({marker!r}, 'w').write('x'), x)[1]")


def _touch(marker: str) -> None:
    with open(marker, "w") as fh:
        fh.write("x")


@keras.saving.register_keras_serializable(package="secateur_test")
class MarkerLayer(keras.layers.Layer):
    """A custom Keras 3 layer whose construction writes its marker."""

    def __init__(self, marker: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marker = marker
        _touch(marker)

    def call(self, x: Any) -> Any:
        return x

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "marker": self.marker}


@keras.saving.register_keras_serializable(package="secateur_test")
def marker_activation(x: Any) -> Any:
    """A custom activation: writes the marker whenever it is traced."""
    _touch(_ACTIVATION_MARKER["path"])
    return x


@functools.cache  # registering the same name twice is an error
def _tf_keras_marker_layer() -> Any:
    import tf_keras

    @tf_keras.saving.register_keras_serializable(package="secateur_test")
    class TfMarkerLayer(tf_keras.layers.Layer):
        def __init__(self, marker: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.marker = marker
            _touch(marker)

        def call(self, x: Any) -> Any:
            return x

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "marker": self.marker}

    return TfMarkerLayer


def _saved(save: Any, path: str, marker: str) -> str:
    """Save, then remove the marker written while building: loading must not recreate it."""
    save(path)
    if os.path.exists(marker):
        os.remove(marker)
    return path


def config_archive(path: str, layers: list[Any]) -> str:
    """A ``.keras`` archive holding only a functional model's config.json with ``layers``:
    a handcrafted config, refused or accepted from the config alone."""
    config = {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "config": {"name": "m", "trainable": True, "layers": layers},
        "registered_name": "Functional",
    }
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", json.dumps(config))
    return path


def keras_lambda(path: str, marker: str, nested: bool = False) -> str:
    """A Keras 3 functional model with a Lambda layer; ``nested``: inside
    a Sequential wrapped in TimeDistributed."""
    inp = keras.Input((3, 4), name="x")
    evil = keras.layers.Lambda(evil_lambda_fn(marker), name="evil")
    if nested:
        inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), evil], name="inner")
        out = keras.layers.TimeDistributed(inner, name="td")(inp)
    else:
        out = evil(keras.layers.Dense(4, name="d")(inp))
    return _saved(keras.Model(inp, out, name="m").save, path, marker)


def keras_custom_layer(path: str, marker: str) -> str:
    inp = keras.Input((4,), name="x")
    out = MarkerLayer(marker, name="custom")(keras.layers.Dense(2, name="d")(inp))
    return _saved(keras.Model(inp, out, name="m").save, path, marker)


def keras_custom_activation(path: str, marker: str) -> str:
    _ACTIVATION_MARKER["path"] = marker
    inp = keras.Input((4,), name="x")
    out = keras.layers.Dense(2, activation=marker_activation, name="act")(inp)
    return _saved(keras.Model(inp, out, name="m").save, path, marker)


def tf_keras_lambda(path: str, marker: str, save_format: str) -> str:
    """The issue's repro: tf.keras with a Lambda, nested in a Sequential."""
    import tf_keras

    inp = tf_keras.Input((4,), name="x")
    inner = tf_keras.Sequential(
        [tf_keras.layers.Dense(4), tf_keras.layers.Lambda(evil_lambda_fn(marker), name="evil")],
        name="inner",
    )
    model = tf_keras.Model(inp, tf_keras.layers.Dense(2, name="d")(inner(inp)), name="m")
    return _saved(lambda p: model.save(p, save_format=save_format), path, marker)


def tf_keras_custom_layer(path: str, marker: str) -> str:
    import tf_keras

    inp = tf_keras.Input((4,), name="x")
    out = _tf_keras_marker_layer()(marker, name="custom")(tf_keras.layers.Dense(2, name="d")(inp))
    model = tf_keras.Model(inp, out, name="m")
    return _saved(lambda p: model.save(p, save_format="tf"), path, marker)


def _marker_resource(marker: str) -> Any:
    """A resource whose saved create and initialize functions write ``marker`` (a WriteFile op).

    ``tf.saved_model.load`` (and ``tf_keras.models.load_model``, which uses it)
    recreates resources by running these functions from the file.
    """
    import tensorflow as tf

    class MarkerResource(tf.saved_model.experimental.TrackableResource):
        def __init__(self) -> None:
            super().__init__()
            self.marker = marker  # a Python str: traced into the functions as a constant

        def _create_resource(self) -> Any:
            tf.io.write_file(self.marker, "created")
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="")

        def _initialize(self) -> Any:
            return tf.io.write_file(self.marker, "initialized")

    return MarkerResource()


def _trap_tf_keras_model() -> Any:
    import tf_keras

    inp = tf_keras.Input((6, 6, 3), name="pixels")
    x = tf_keras.layers.Conv2D(8, 3, name="c1")(inp)
    x = tf_keras.layers.BatchNormalization(name="bn")(x)
    x = tf_keras.layers.ReLU(name="relu")(x)
    x = tf_keras.layers.Conv2D(6, 3, name="c2")(x)
    x = tf_keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return tf_keras.Model(inp, tf_keras.layers.Dense(3, name="scores")(x), name="m")


def trap_module(path: str, marker: str) -> str:
    """Trap (1): a plain tf.Module holding the resource, beside an empty keras_metadata.pb."""
    import tensorflow as tf

    module = tf.Module()
    module.trap = _marker_resource(marker)
    _saved(lambda p: tf.saved_model.save(module, p), path, marker)
    with open(os.path.join(path, "keras_metadata.pb"), "wb"):
        pass
    return path


def trap_tf_keras(path: str, marker: str, on_layer: bool) -> str:
    """Traps (2) and (3): a valid tf.keras model, the resource on the model or on layer 'c1'."""
    model = _trap_tf_keras_model()
    owner = model.get_layer("c1") if on_layer else model
    owner.trap = _marker_resource(marker)
    return _saved(lambda p: model.save(p, save_format="tf"), path, marker)
