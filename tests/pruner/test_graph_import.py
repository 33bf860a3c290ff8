"""The graph importer: SavedModels without Keras metadata rebuilt as Keras models.

Every model here is built and exported by the test itself, so loading it
with ``tf.saved_model.load`` to get reference outputs runs nothing foreign.
The importer itself never loads or runs the file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from secateur.pruner import PruneSpec, apply_plan, make_plan
from secateur.pruner.errors import UnsupportedModelError
from secateur.pruner.modelio import signature_of
from secateur.pruner.savedmodel.graph_import import import_graph
from secateur.pruner.savedmodel.reader import SavedModelFile

from .conftest import kill_pruned_channels, randomize

layers = keras.layers
HOW = ("export", "saved_model_save")


def export(model: Any, path: str, how: str) -> SavedModelFile:
    if how == "export":
        model.export(path, verbose=False)
    else:
        tf.saved_model.save(model, path)
    return SavedModelFile(path)


def served(path: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The SavedModel's own serving outputs (a file this test wrote)."""
    fn = tf.saved_model.load(path).signatures["serving_default"]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in feeds.items()}).items()}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.max(np.abs(got - want)) / max(1e-6, float(np.max(np.abs(want)))))


def feeds_for(saved: SavedModelFile, n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        t.name: rng.uniform(-2, 2, (n, *t.shape[1:])).astype(t.dtype)
        for t in saved.signature().inputs
    }


def outputs_of(model: Any, saved: SavedModelFile, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    sig = saved.signature()
    args = [feeds[t.name] for t in sig.inputs]
    ys = model(args[0] if len(args) == 1 else args, training=False)
    ys = ys if isinstance(ys, (list, tuple)) else [ys]
    return {t.name: np.asarray(y) for t, y in zip(sig.outputs, ys, strict=True)}


def assert_imports_exactly(model: Any, path: str, how: str, tol: float = 1e-4) -> Any:
    """Export ``model``, import it, and compare signatures and outputs."""
    saved = export(model, path, how)
    imported = import_graph(saved)
    assert signature_of(imported) == saved.signature()
    feeds = feeds_for(saved)
    want = served(path, feeds)
    got = outputs_of(imported, saved, feeds)
    for key in want:
        assert relative_error(got[key], want[key]) <= tol, key
    return imported


# -- small models ---------------------------------------------------------------


def conv_bn_dense() -> Any:
    inp = keras.Input((12, 12, 3), name="img")
    x = layers.Conv2D(8, 3, padding="same")(inp)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(6, 3, strides=2, use_bias=False)(x)
    x = layers.BatchNormalization(scale=False)(x)
    x = layers.Activation("tanh")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(5)(x)
    return keras.Model(inp, layers.Softmax()(x))


def depthwise_padding() -> Any:
    inp = keras.Input((10, 10, 4))
    x = layers.ZeroPadding2D(((1, 0), (0, 1)))(inp)
    x = layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(max_value=6.0)(x)
    x = layers.Conv2D(8, 1, activation="elu")(x)
    x = layers.AveragePooling2D(2, padding="same")(x)
    x = layers.Conv2D(8, 3, padding="same", dilation_rate=2)(x)
    x = layers.DepthwiseConv2D(3, padding="same")(x)
    return keras.Model(inp, layers.GlobalAveragePooling2D()(x))


def residual_concat_swish_se() -> Any:
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="swish")(inp)
    y = layers.Conv2D(8, 3, padding="same")(x)
    y = layers.BatchNormalization()(y)
    x = layers.Add()([x, y])
    se = layers.GlobalAveragePooling2D(keepdims=True)(x)
    se = layers.Conv2D(2, 1, activation="relu")(se)
    se = layers.Conv2D(8, 1, activation="sigmoid")(se)
    x = layers.Multiply()([x, se])
    z = layers.Conv2D(4, 1, activation="selu")(x)
    x = layers.Concatenate()([x, z, layers.LeakyReLU(0.1)(x)])
    x = layers.Conv2D(6, 3, groups=1)(x)
    x = layers.GlobalMaxPooling2D()(x)
    return keras.Model(inp, layers.Dense(3, activation="sigmoid")(x))


def resize_rescale_normalize() -> Any:
    inp = keras.Input((6, 6, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(inp)
    norm = layers.Normalization(mean=[0.1, -0.2, 0.3], variance=[1.5, 0.5, 2.0])
    x = norm(x)
    x = layers.Conv2D(4, 3, padding="same")(x)
    x = layers.UpSampling2D(interpolation="bilinear")(x)
    x = layers.Resizing(9, 9, interpolation="nearest")(x)
    x = layers.Conv2D(4, 3)(x)
    x = layers.Resizing(5, 5)(x)
    x = layers.Reshape((25, 4))(x)
    x = layers.Dense(2)(x)
    return keras.Model(inp, layers.Flatten()(x))


def two_in_two_out() -> Any:
    a = keras.Input((5, 5, 2), name="left")
    b = keras.Input((5, 5, 2), name="right")
    x = layers.Conv2D(4, 3, padding="same", name="ca")(a)
    y = layers.Conv2D(4, 3, padding="same", name="cb")(b)
    d = layers.Subtract()([x, y])
    q = keras.ops.divide(x, keras.ops.add(keras.ops.abs(y), 1.0))
    m = layers.Maximum()([d, q])
    out_z = layers.GlobalAveragePooling2D(name="zeta")(m)
    out_a = layers.Dense(3, name="alpha")(layers.Flatten()(d))
    return keras.Model([a, b], {"zeta": out_z, "alpha": out_a})


SMALL: dict[str, Callable[[], Any]] = {
    "conv_bn_dense": conv_bn_dense,
    "depthwise_padding": depthwise_padding,
    "residual_concat_swish_se": residual_concat_swish_se,
    "resize_rescale_normalize": resize_rescale_normalize,
    "two_in_two_out": two_in_two_out,
}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_import_small_model_same_outputs_and_signature(name: str, how: str, tmp_path: Any) -> None:
    assert_imports_exactly(randomize(SMALL[name]()), str(tmp_path / "sm"), how)


@pytest.mark.parametrize("name", ["conv_bn_dense", "residual_concat_swish_se"])
def test_imported_model_prunes_exactly_on_dead_channels(name: str, tmp_path: Any) -> None:
    path = str(tmp_path / "sm")
    imported = assert_imports_exactly(randomize(SMALL[name]()), path, "export")
    plan = make_plan(imported, PruneSpec(ratio=0.3, criterion="random", seed=3))
    kill_pruned_channels(imported, plan)
    pruned = apply_plan(imported, plan)
    assert pruned.count_params() < imported.count_params()
    saved = SavedModelFile(path)
    feeds = feeds_for(saved, seed=1)
    want = outputs_of(imported, saved, feeds)
    got = outputs_of(pruned, saved, feeds)
    for key in want:
        assert relative_error(got[key], want[key]) <= 1e-4


def test_batchnorm_imports_as_trainable_batchnorm_with_its_own_parameters(tmp_path: Any) -> None:
    model = randomize(conv_bn_dense())
    imported = assert_imports_exactly(model, str(tmp_path / "sm"), "export")
    original = [la for la in model.layers if isinstance(la, layers.BatchNormalization)]
    found = [la for la in imported.layers if isinstance(la, layers.BatchNormalization)]
    assert len(found) == len(original) and all(la.trainable for la in found)
    np.testing.assert_array_equal(found[0].gamma.numpy(), original[0].gamma.numpy())
    np.testing.assert_array_equal(found[0].moving_mean.numpy(), original[0].moving_mean.numpy())


class _Dense(tf.Module):
    """A TF-Hub-style module: variables and a tf.function, no Keras at all."""

    def __init__(self, exotic: bool = False) -> None:
        self.w = tf.Variable(np.random.default_rng(0).normal(size=(4, 3)).astype("float32"))
        self.b = tf.Variable(np.full((3,), 0.5, "float32"))
        self.exotic = exotic

    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32, name="features")])
    def serve(self, x: Any) -> dict[str, Any]:
        y = tf.nn.relu(tf.matmul(x, self.w) + self.b)
        if self.exotic:
            y = tf.math.cumsum(y, axis=1)
        return {"scores": y}


def test_tf_module_with_variables_imports_as_dense(tmp_path: Any) -> None:
    module, path = _Dense(), str(tmp_path / "hub")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    saved = SavedModelFile(path)
    imported = import_graph(saved)
    assert any(isinstance(la, layers.Dense) for la in imported.layers)
    feeds = feeds_for(saved)
    got, want = outputs_of(imported, saved, feeds), served(path, feeds)
    assert relative_error(got["scores"], want["scores"]) <= 1e-6


def test_unsupported_op_names_op_type_and_node(tmp_path: Any) -> None:
    module, path = _Dense(exotic=True), str(tmp_path / "hub")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    with pytest.raises(UnsupportedModelError, match=r"Received: op Cumsum at node '.*Cumsum'"):
        import_graph(SavedModelFile(path))


def test_missing_signature_is_a_clear_error(tmp_path: Any) -> None:
    module, path = _Dense(), str(tmp_path / "hub")
    tf.saved_model.save(module, path, signatures={"predict": module.serve})
    with pytest.raises(UnsupportedModelError, match=r"'serving_default'.*Received: .*predict"):
        import_graph(SavedModelFile(path))


def test_tf1_style_savedmodel_is_a_clear_error(tmp_path: Any) -> None:
    path = str(tmp_path / "tf1")
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        x = tf.compat.v1.placeholder(tf.float32, (None, 2), name="x")
        w = tf.compat.v1.get_variable("w", initializer=tf.ones((2, 2)))
        sess.run(tf.compat.v1.global_variables_initializer())
        tf.compat.v1.saved_model.simple_save(sess, path, {"x": x}, {"y": tf.matmul(x, w)})
    with pytest.raises(UnsupportedModelError, match="TF1-style"):
        import_graph(SavedModelFile(path))


# -- keras.applications -----------------------------------------------------------


def application(name: str) -> Any:
    kwargs: dict[str, Any] = {"alpha": 0.35} if name == "MobileNetV2" else {}
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(32, 32, 3), classes=5, classifier_activation=None, **kwargs
    )
    return randomize(model)


def test_mobilenetv2_application_imports_exactly(tmp_path: Any) -> None:
    assert_imports_exactly(application("MobileNetV2"), str(tmp_path / "sm"), "export")


@pytest.mark.slow
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(
    "name", ["VGG16", "ResNet50", "MobileNetV2", "DenseNet121", "EfficientNetB0"]
)
def test_application_imports_and_prunes_exactly(name: str, how: str, tmp_path: Any) -> None:
    path = str(tmp_path / "sm")
    imported = assert_imports_exactly(application(name), path, how)
    plan = make_plan(imported, PruneSpec(ratio=0.3, criterion="random", seed=7))
    kill_pruned_channels(imported, plan)
    pruned = apply_plan(imported, plan)
    assert pruned.count_params() < imported.count_params()
    saved = SavedModelFile(path)
    feeds = feeds_for(saved)
    # Dead channels are zeroed in the imported model only, so the pruned model
    # is compared with the imported one it was cut from.
    want, got = outputs_of(imported, saved, feeds), outputs_of(pruned, saved, feeds)
    for key in want:
        assert relative_error(got[key], want[key]) <= 1e-4
