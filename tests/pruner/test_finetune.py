"""Fine-tuning: the study's recipe, device selection, progress and cancellation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from secateur.pruner.data import make_dataset
from secateur.pruner.errors import CancelledError, InvalidSpecError
from secateur.pruner.finetune import (
    TrainConfig,
    compile_for_training,
    evaluate,
    finetune,
    outputs_probabilities,
    recalibrate_batchnorm,
    select_device,
)
from secateur.pruner.modelio import load_model


def _no_tpu():
    raise ValueError("no TPU")


def test_selectDevice_tpuWhenResolverWorks() -> None:
    made = []
    device = select_device(
        tpu_resolver=lambda: "resolver", make_strategy=lambda k, a: made.append((k, a)) or k
    )
    assert (device.kind, device.strategy) == ("TPU", "TPU")
    assert made == [("TPU", "resolver")]
    assert device.use_xla("auto") is True


def test_selectDevice_mirroredForGpus_defaultOnCpu() -> None:
    gpu = select_device(_no_tpu, lambda: ["g0", "g1"], lambda k, a: f"{k}:{len(a)}")
    assert (gpu.kind, gpu.count, gpu.strategy) == ("GPU", 2, "GPU:2")
    cpu = select_device(_no_tpu, lambda: [], lambda k, a: k)
    assert (cpu.kind, cpu.strategy) == ("CPU", "CPU")
    assert cpu.use_xla("auto") is False and cpu.use_xla(True) is True
    assert select_device().kind == "CPU"  # this machine, for real


def test_trainConfig_studyDefaults_andValidation() -> None:
    cfg = TrainConfig()
    assert (cfg.batch_size, cfg.learning_rate, cfg.momentum) == (128, 0.01, 0.9)
    with pytest.raises(InvalidSpecError, match="batch_size=0"):
        TrainConfig(batch_size=0)
    with pytest.raises(InvalidSpecError, match="learning_rate"):
        TrainConfig(learning_rate=-1)


def test_compile_sgdMomentumAndLossFromOutput() -> None:
    inp = keras.Input((4,))
    logits = keras.Model(inp, keras.layers.Dense(3)(inp))
    probs = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(inp))
    assert not outputs_probabilities(logits) and outputs_probabilities(probs)
    compile_for_training(logits, TrainConfig(), select_device())
    assert isinstance(logits.optimizer, keras.optimizers.SGD)
    assert float(logits.optimizer.momentum) == 0.9
    assert logits.loss.get_config()["from_logits"] is True


def test_finetune_improvesAccuracyOnRealData_reportsProgress(digits_data) -> None:
    model = load_model(digits_data.model_path)
    train = make_dataset(sorted(_glob(digits_data.train_glob)), (32, 32, 3), 64, shuffle=True)
    ev = make_dataset([digits_data.eval_file], (32, 32, 3), 128)
    # Scramble the classifier so there is something to learn back.
    head = model.get_layer("logits")
    head.set_weights([np.zeros_like(w) for w in head.get_weights()])
    before = evaluate(model, ev)
    events = []
    trained, history = finetune(
        model, train, TrainConfig(epochs=1, batch_size=64), select_device(), events.append
    )
    after = evaluate(trained, ev)
    assert after > before + 0.3
    # 1400 examples in batches of 64; the total is unknown for interleaved files.
    assert events[-1].epoch == 1 and events[-1].step == 22
    assert len(history["loss"]) == 1


def test_finetune_cancelHook_stopsAndRaises(digits_data) -> None:
    model = load_model(digits_data.model_path)
    train = make_dataset(sorted(_glob(digits_data.train_glob)), (32, 32, 3), 32)
    steps = []
    with pytest.raises(CancelledError):
        finetune(
            model,
            train,
            TrainConfig(epochs=5, batch_size=32),
            select_device(),
            on_progress=steps.append,
            should_cancel=lambda: len(steps) >= 3,
        )
    assert len(steps) == 3


def _glob(pattern: str) -> list[str]:
    import glob

    return glob.glob(pattern)


def _reference_accuracy(model, ds) -> tuple[int, int]:
    """The old way: one eager batch at a time, counted on the host."""
    correct = total = 0
    for images, labels in ds:
        pred = np.argmax(np.asarray(model(images, training=False)), axis=-1)
        correct += int(np.sum(pred == np.asarray(labels)))
        total += int(pred.shape[0])
    return correct, total


def test_evaluate_compiledLoop_equalsBatchByBatchReference(digits_data) -> None:
    from secateur.pruner.finetune import evaluate_counts

    model = load_model(digits_data.model_path)
    # 397 examples in batches of 96: the last batch is partial (13).
    ev = make_dataset([digits_data.eval_file], (32, 32, 3), 96)
    expected = _reference_accuracy(model, ev)
    assert expected[1] == 397
    assert evaluate_counts(model, ev) == expected
    assert evaluate(model, ev) == expected[0] / expected[1]


def test_stepsPerExecution_autoIsOneOnCpu_explicitReachesCompile() -> None:
    from secateur.pruner.finetune import (
        Device,
        resolve_steps_per_execution,
        training_setup,
    )

    cpu = select_device()
    setup = training_setup(TrainConfig(), cpu, steps_per_epoch=22)
    assert setup.to_dict() == {"steps_per_execution": 1, "mixed_precision": "off", "xla": False}
    # auto on accelerators: long loops, never longer than an epoch.
    assert resolve_steps_per_execution("auto", "TPU", 22) == 22
    assert resolve_steps_per_execution("auto", "TPU", 5000) == 100
    assert resolve_steps_per_execution("auto", "GPU", None) == 16
    assert resolve_steps_per_execution(7, "CPU", 3) == 7
    assert training_setup(TrainConfig(), Device("GPU", "GPU:0", 1)).mixed_precision == (
        "mixed_float16"
    )
    assert training_setup(TrainConfig(), Device("TPU", "t", 1)).mixed_precision == (
        "mixed_bfloat16"
    )
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(3)(inp))
    compile_for_training(model, TrainConfig(steps_per_execution=5), cpu, 5)
    assert model.steps_per_execution == 5
    with pytest.raises(InvalidSpecError, match="steps_per_execution=0"):
        TrainConfig(steps_per_execution=0)
    with pytest.raises(InvalidSpecError, match="mixed_precision must be one of"):
        TrainConfig(mixed_precision="float8")


def test_finetune_stepsPerExecution_progressOncePerExecution(digits_data) -> None:
    model = load_model(digits_data.model_path)
    train = make_dataset(sorted(_glob(digits_data.train_glob)), (32, 32, 3), 64)
    events = []
    _, history = finetune(
        model,
        train,
        TrainConfig(epochs=1, batch_size=64, steps_per_execution=5),
        select_device(),
        events.append,
    )
    # 22 steps in executions of 5: progress after steps 5, 10, 15, 20 and 22.
    assert [e.step for e in events] == [5, 10, 15, 20, 22]
    assert len(history["loss"]) == 1 and np.isfinite(history["loss"][0])


def test_finetune_explicitMixedPrecision_trainsAndReturnsFloat32(digits_data) -> None:
    model = load_model(digits_data.model_path)
    train = make_dataset(sorted(_glob(digits_data.train_glob)), (32, 32, 3), 64)
    ev = make_dataset([digits_data.eval_file], (32, 32, 3), 128)
    config = TrainConfig(epochs=1, batch_size=64, mixed_precision="mixed_bfloat16")
    before = [w.copy() for w in model.get_weights()]
    trained, history = finetune(model, train, config, select_device())
    assert np.isfinite(history["loss"][0])
    # The published model is plain float32, with the weights the mixed copy learned.
    assert {layer.dtype_policy.name for layer in trained.layers} == {"float32"}
    assert any(not np.array_equal(a, b) for a, b in zip(before, trained.get_weights()))
    assert evaluate(trained, ev) > 0.5


# -- BatchNorm re-estimation after fine-tuning ---------------------------------------


def _bn_net() -> keras.Model:
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(2, 1, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="frozen_bn")(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("frozen_bn").trainable = False
    return model


def _batches(n: int, size: int = 8):
    import tensorflow as tf

    images = np.random.default_rng(0).normal(3.0, 2.0, (n * size, 6, 6, 3)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((images, np.zeros(n * size, "int64")))
    return ds.batch(size), [images[i : i + size] for i in range(0, n * size, size)]


def _check_stats(model: keras.Model, batches: list[np.ndarray]) -> None:
    conv = keras.Model(model.input, model.get_layer("conv").output)
    per = [np.asarray(conv(b)).reshape(-1, 4) for b in batches]
    bn = model.get_layer("bn")
    # Each statistic is the mean over the batches of that batch's mean and variance.
    np.testing.assert_allclose(bn.moving_mean, np.mean([p.mean(0) for p in per], 0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance, np.mean([p.var(0) for p in per], 0), rtol=1e-4)
    assert bn.momentum == 0.99


def test_recalibrateBatchnorm_statsAreTheMeanOverTheBatches_frozenLayerKept() -> None:
    model = _bn_net()
    frozen = [np.asarray(w).copy() for w in model.get_layer("frozen_bn").weights]
    weights = [np.asarray(w).copy() for w in model.get_layer("conv").weights]
    ds, batches = _batches(5)
    assert recalibrate_batchnorm(model, ds, 3) == 3
    _check_stats(model, batches[:3])
    for before, after in zip(frozen, model.get_layer("frozen_bn").weights):
        np.testing.assert_array_equal(before, after)  # trainable=False: kept on purpose
    for before, after in zip(weights, model.get_layer("conv").weights):
        np.testing.assert_array_equal(before, after)  # no weight is trained
    # A data set shorter than asked: every batch it has; none asked: nothing changes.
    assert recalibrate_batchnorm(model, ds, 50) == 5
    _check_stats(model, batches)
    mean = np.asarray(model.get_layer("bn").moving_mean).copy()
    assert recalibrate_batchnorm(model, ds, 0) == 0
    np.testing.assert_array_equal(mean, model.get_layer("bn").moving_mean)


def test_recalibrateBatchnorm_modelInAStrategy_reestimatedOnTheHostAndCopiedBack() -> None:
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = _bn_net()
    ds, batches = _batches(2)
    assert recalibrate_batchnorm(model, ds, 2) == 2
    _check_stats(model, batches)
