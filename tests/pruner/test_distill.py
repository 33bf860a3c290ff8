"""Distillation from the original while fine-tuning (issue 12 §5)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from secateur.pruner.config import TrainConfig
from secateur.pruner.distill import as_logits, distillation_loss
from secateur.pruner.errors import InvalidSpecError
from secateur.pruner.finetune import finetune, select_device

layers = keras.layers


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_distillationLoss_equalsHandComputation() -> None:
    s = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype="float32")
    t = np.array([[1.0, 1.5, -0.5], [3.0, -1.0, 0.0]], dtype="float32")
    y = np.array([0, 2])
    alpha, temp = 0.7, 3.0
    pt, ps = _softmax(t / temp), _softmax(s / temp)
    kd = (pt * (np.log(pt) - np.log(ps))).sum(-1) * temp**2
    ce = -np.log(_softmax(s)[np.arange(2), y])
    expected = np.mean(alpha * kd + (1 - alpha) * ce)
    got = float(distillation_loss(y, s, t, alpha, temp))
    assert got == pytest.approx(expected, rel=1e-5)
    # A softmax output's logits are its log-probabilities: the same loss.
    probs = as_logits(_softmax(s), True)
    assert float(distillation_loss(y, probs, t, alpha, temp)) == pytest.approx(expected, rel=1e-4)
    # alpha 0 is plain cross-entropy.
    assert float(distillation_loss(y, s, t, 0.0, temp)) == pytest.approx(ce.mean(), rel=1e-5)


def _model(width: int, softmax: bool) -> keras.Model:
    inp = keras.Input((6,))
    x = layers.Dense(width, activation="relu")(inp)
    return keras.Model(inp, layers.Dense(3, activation="softmax" if softmax else None)(x))


def test_finetune_withTeacher_trainsTowardsItsSoftOutputs() -> None:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype("float32")
    y = rng.integers(0, 3, 256)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    teacher = _model(32, softmax=True)
    config = TrainConfig(epochs=20, learning_rate=0.05, distill_alpha=1.0, distill_temperature=2.0)
    device = select_device()

    def gap(model: keras.Model) -> float:
        return float(np.abs(model.predict(x, verbose=0) - teacher.predict(x, verbose=0)).mean())

    student = _model(8, softmax=False)
    keras.utils.set_random_seed(1)
    start = gap(keras.Model(student.input, keras.layers.Softmax()(student.output)))
    trained, history = finetune(student, ds, config, device, teacher=teacher)
    end = gap(keras.Model(trained.input, keras.layers.Softmax()(trained.output)))
    assert end < start / 2 and len(history["loss"]) == 20 and "accuracy" in history
    assert not any(w.name for w in trained.weights if "teacher" in w.path)


def test_distillSettings_validated() -> None:
    with pytest.raises(InvalidSpecError, match="distill_alpha"):
        TrainConfig(distill_alpha=1.5)
    with pytest.raises(InvalidSpecError, match="distill_temperature"):
        TrainConfig(distill_temperature=0.0)
