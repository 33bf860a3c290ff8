"""Sparsity training (issue 12 §4): L1 on prunable BatchNorm gammas before scoring."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from secateur.pruner.config import TrainConfig
from secateur.pruner.errors import InvalidSpecError
from secateur.pruner.finetune import finetune, select_device
from secateur.pruner.sparsity import prunable_gammas, sparsity_train
from secateur.pruner.tracing import analyze

layers = keras.layers


def _model() -> keras.Model:
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="c1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="c2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(4, activation="softmax", name="head")(x)
    return keras.Model(inp, out)


def _data() -> object:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8, 8, 3)).astype("float32")
    y = (x[:, :, :, 0].mean(axis=(1, 2)) > 0).astype("int64") + 2 * (x[:, 0, 0, 1] > 0)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()


def _gammas(model: keras.Model) -> np.ndarray:
    return np.concatenate([np.abs(model.get_layer(n).gamma.numpy()) for n in ("bn1", "bn2")])


def test_sparsityTraining_shrinksGammas_leavesNoRegulariser() -> None:
    model = _model()
    graph = analyze(model)
    assert prunable_gammas(graph) == ["bn1", "bn2"]
    before = model.get_weights()
    config = TrainConfig(
        epochs=1, steps_per_epoch=30, learning_rate=0.1, sparsity_epochs=1, sparsity_lambda=0.5
    )
    device = select_device()
    sparse = sparsity_train(model, graph, _data(), config, device)
    # The original is left as it was: it stays the job's baseline.
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    plain, _ = finetune(_model(), _data(), config, device)
    assert (_gammas(sparse) < 0.1).mean() > (_gammas(plain) < 0.1).mean() + 0.5
    config_text = json.dumps(sparse.get_config())
    assert "L1" not in config_text and sparse.losses == []
    assert all(sparse.get_layer(n).gamma_regularizer is None for n in ("bn1", "bn2"))


def test_sparsityEpochs_withoutTrainData_refused() -> None:
    from secateur.server.pipeline.job_request import JobRequest

    with pytest.raises(InvalidSpecError, match="sparsity_epochs needs train_data") as exc:
        JobRequest("m.keras", "out", train=TrainConfig(sparsity_epochs=2))
    assert exc.value.field == "sparsity_epochs"
    with pytest.raises(InvalidSpecError, match="sparsity_lambda"):
        TrainConfig(sparsity_lambda=-1.0)
