"""Model files that run code when loaded, for the model-safety tests.

Each writes ``marker`` if any of its code runs. Lambdas are built from source
with the marker path as a literal, so their bytecode works in any process (a
server's worker included), not only where this module is imported. Custom
classes carry the path in their config and are registered here, so a loader
in this process *would* find and run them: refusing them is the loader's job.
"""

from __future__ import annotations

import functools
import os
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
