"""SavedModels without Keras metadata, as TF Serving deployments hold them, for import tests.

Keras 3 models written with ``model.export()`` or ``tf.saved_model.save()``;
their dead channels (zeroed filters, biases, BN gamma/beta) let a prune that
removes only those channels be checked exactly against the SavedModel itself.
Reference outputs come from ``tf.saved_model.load`` of these test-written
files (or of Secateur's own output), never from a user's file.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

APPLICATIONS = ("VGG16", "ResNet50", "MobileNetV2", "DenseNet121", "EfficientNetB0")
EXPORTS = ("export", "saved_model_save")
SHAPE = (32, 32, 3)  # the digits test data's images, 10 classes
DEAD_RATIO = 0.3


def application(name: str) -> Any:
    """A keras.applications model, random weights, 32x32 inputs, 10 classes."""
    keras.utils.set_random_seed(0)
    return getattr(keras.applications, name)(weights=None, input_shape=SHAPE, classes=10)


def small_cnn() -> Any:
    """Conv/BN/ReLU, a residual add, a depthwise conv, pooling, a dense head."""
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inp = keras.Input(SHAPE, name="image")
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="c1")(inp)
    x = layers.ReLU(name="r1")(layers.BatchNormalization(name="bn1")(x))
    y = layers.Conv2D(16, 3, padding="same", name="c2")(x)
    y = layers.ReLU(name="r2")(layers.BatchNormalization(name="bn2")(y))
    x = layers.Add(name="add")([x, layers.Conv2D(16, 1, name="c3")(y)])
    x = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = layers.Conv2D(24, 1, name="c4")(layers.BatchNormalization(name="bn3")(x))
    x = layers.GlobalAveragePooling2D(name="pool")(layers.ReLU(name="r3")(x))
    return keras.Model(inp, layers.Dense(10, activation="softmax", name="probs")(x))


def kill_channels(model: Any, ratio: float = DEAD_RATIO) -> int:
    """Make the channels a ``bn_scale`` plan at ``ratio`` removes dead; returns how many."""
    from secateur.pruner import PruneSpec, make_plan
    from tests.pruner.conftest import kill_pruned_channels

    rng = np.random.default_rng(1)
    for layer in model.layers:  # non-trivial statistics, so a wrong import shows
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = (w.numpy() for w in layer.weights)
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 2.0, var.shape),
            ])  # fmt: skip
    plan = make_plan(model, PruneSpec(ratio=ratio, criterion="bn_scale"))
    kill_pruned_channels(model, plan)
    return int(plan.removed_channels)


def export(model: Any, path: str, how: str) -> str:
    """Write ``model`` as a SavedModel without Keras metadata, the way ``how`` names."""
    import tensorflow as tf

    if how == "export":
        model.export(path, verbose=False)
    else:
        tf.saved_model.save(model, path)
    return path


def served(path: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """``serving_default`` outputs of a SavedModel this test wrote (or Secateur published)."""
    import tensorflow as tf

    fn = tf.saved_model.load(path).signatures["serving_default"]
    (key,) = fn.structured_input_signature[1]
    return {k: v.numpy() for k, v in fn(**{key: tf.constant(x)}).items()}


def images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, *SHAPE)).astype("float32")


def assert_same(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    """Same keys, shapes, and values within relative error 1e-4."""
    assert sorted(reference) == sorted(got)
    for key, want in reference.items():
        assert got[key].shape == want.shape, key
        err = np.abs(got[key] - want).max() / max(float(np.abs(want).max()), 1e-12)
        assert err <= 1e-4, (key, err)


def unsupported_op_savedmodel(path: str) -> str:
    """A serving function whose graph holds a ``Cumsum`` op (no Keras layer maps to it)."""
    import tensorflow as tf

    class Scan(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32, name="x")])
        def __call__(self, x: Any) -> Any:
            return {"y": tf.math.cumsum(x, axis=1) * 2.0}

    module = Scan()
    tf.saved_model.save(module, path, signatures={"serving_default": module.__call__})
    return path
