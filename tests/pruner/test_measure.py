"""Measurement of original vs pruned: figures, provenance, no side effects."""

from __future__ import annotations

import numpy as np

from secateur.pruner import PruneSpec, prune
from secateur.pruner import measure as measure_mod
from secateur.pruner.finetune import TrainConfig, select_device
from secateur.pruner.measure import MeasureConfig, measure_models
from secateur.pruner.models import vgg16_bn

QUICK = MeasureConfig(warmup_steps=1, steps=3, rounds=2, latency_runs=3)


def _pair():
    model = vgg16_bn((32, 32, 3), 10, width=0.25, dense=64)
    pruned = prune(model, PruneSpec(ratio=0.5, scope="layerwise")).model
    rng = np.random.default_rng(0)
    batch = (rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32"), rng.integers(0, 10, 16))
    return model, pruned, batch


def test_measureModels_prunedIsSmallerOnEveryStaticFigure_andSaysHow() -> None:
    model, pruned, batch = _pair()
    before = [w.numpy().copy() for w in pruned.weights]
    figs = measure_models(
        {"original": model, "pruned": pruned},
        batch,
        TrainConfig(batch_size=16),
        select_device(),
        None,
        QUICK,
    )
    o, p = figs["original"], figs["pruned"]
    assert p.params == pruned.count_params() < o.params == model.count_params()
    assert p.weight_bytes == 4 * p.params
    assert p.flops < 0.35 * o.flops
    assert p.peak_memory_bytes is not None and o.peak_memory_bytes is not None
    assert p.peak_memory_bytes < o.peak_memory_bytes
    assert p.train_step_seconds > 0 and p.train_step_p90_seconds >= p.train_step_seconds
    assert p.latency_batch1_seconds > 0 and p.accuracy is None
    assert o.how["batch_size"] == 16 and o.how["steps"] == 6 and o.how["rounds_interleaved"] == 2
    assert o.how["device"].startswith("CPU") and o.how["xla"] is False
    # Measurement trains clones: the models passed in keep their weights.
    for a, b in zip(before, pruned.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())


def test_measureModels_withoutAllocatorStats_saysHowToGetThem(monkeypatch) -> None:
    _, pruned, batch = _pair()
    monkeypatch.setattr(measure_mod, "memory_stats_available", lambda device="CPU:0": False)
    figs = measure_models(
        {"p": pruned}, batch, TrainConfig(batch_size=16), select_device(), None, QUICK
    )
    assert figs["p"].peak_memory_bytes is None
    assert "TF_CPU_ALLOCATOR_USE_BFC=true" in figs["p"].how["memory"]
