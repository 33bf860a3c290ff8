"""Cost-profile variants measured in child processes (pruner/probe.py)."""

from __future__ import annotations

from typing import Any

import keras
import pytest

from secateur.pruner import PruneSpec
from secateur.pruner import costmodel as cm
from secateur.pruner.config import MeasureConfig
from secateur.pruner.meter import DeviceMeter
from secateur.pruner.probe import group_key, measure_here, measure_isolated, model_digest
from secateur.pruner.tracing import analyze
from tests.pruner.conftest import randomize

layers = keras.layers
TINY = MeasureConfig(warmup_steps=1, steps=1, rounds=1, latency_runs=1)


@pytest.fixture(scope="module")
def cnn() -> Any:
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for i, width in enumerate((16, 16)):
        x = layers.Conv2D(width, 3, padding="same", name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return randomize(keras.Model(inputs, layers.Dense(4, activation="softmax")(x), name="cnn"))


def _jobs(model: Any) -> tuple[Any, list[tuple[str, list[int]]]]:
    graph = analyze(model)
    groups = [g for g in graph.groups() if g.kind == "channels" and not g.frozen]
    spec = PruneSpec(round_to=8)
    return graph, [(group_key(g), cm.probe_widths(g, spec)) for g in groups]


def test_measureIsolated_memoryLimitPassed_eachGroupInAFreshChild_sameFiguresShape(cnn) -> None:
    graph, jobs = _jobs(cnn)
    assert len(jobs) == 2 and all(w for _, w in jobs)
    meter = DeviceMeter(batch_size=4, measure=TINY, isolate=True)
    stats: dict[str, Any] = {}
    isolated = list(
        measure_isolated(cnn, jobs, ["step_time"], meter, model_digest(cnn), limit=1, stats=stats)
    )
    # A 1-byte limit: every child stops after one group and a fresh one takes the rest.
    assert stats == {"processes": 2, "fallback": None}
    here = list(measure_here(cnn, graph, jobs, ["step_time"], meter))
    assert [(k, w) for k, w, _ in isolated] == [(k, w) for k, w, _ in here] == jobs
    for (_, widths, figures), (_, _, local) in zip(isolated, here, strict=True):
        assert set(figures) == set(local) == {"full", *map(str, widths)}
        assert all(f["step_time"] > 0 for f in figures.values())


def test_measureIsolated_childRebuildsAnotherArchitecture_refusesAndReportsWhy(cnn) -> None:
    _, jobs = _jobs(cnn)
    meter = DeviceMeter(batch_size=4, measure=TINY, isolate=True)
    stats: dict[str, Any] = {}
    assert list(measure_isolated(cnn, jobs, ["step_time"], meter, "0" * 64, stats=stats)) == []
    assert stats["processes"] == 1
    assert "another architecture" in stats["fallback"]


def test_profileCosts_onThisCpu_isolatesByDefault_andFallsBackInProcessWhenAChildCannot(
    cnn, monkeypatch
) -> None:
    graph, jobs = _jobs(cnn)
    groups = [g for g in graph.groups() if g.kind == "channels" and not g.frozen]
    spec = PruneSpec(round_to=8)
    meter = DeviceMeter(batch_size=4, measure=TINY)
    assert meter.isolate  # a single-host CPU
    profile = cm.profile_costs(cnn, graph, groups, spec, ["step_time"], meter)
    assert profile.how["profile_processes"] == 1 and "profile_isolation_failed" not in profile.how
    assert sorted(profile.groups) == sorted(k for k, _ in jobs)
    assert profile.measurements == sum(1 + len(w) for _, w in jobs)
    # A child that cannot rebuild the model: the profile is still whole, measured here.
    monkeypatch.setattr(cm, "model_digest", lambda _model: "0" * 64)
    fallback = cm.profile_costs(cnn, graph, groups, spec, ["step_time"], meter)
    assert "another architecture" in fallback.how["profile_isolation_failed"]
    assert sorted(fallback.groups) == sorted(profile.groups)
    assert fallback.measurements == profile.measurements


def test_deviceMeter_isolation_defaultsOnlyForASingleHostCpu() -> None:
    from secateur.pruner.finetune import Device

    assert not DeviceMeter(device=Device("GPU", "GPU:0", 1)).isolate
    assert not DeviceMeter(device=Device("CPU", "workers", 2, members=2)).isolate
    assert DeviceMeter(device=Device("CPU", "CPU:0", 1)).isolate
    assert not DeviceMeter(device=Device("CPU", "CPU:0", 1), isolate=False).isolate
