"""Every number a job takes is finite and within a sensible range, refused as
InvalidSpecError naming the field (NaN and infinities included)."""

from __future__ import annotations

import math

import pytest

from secateur.pruner.config import MeasureConfig, TrainConfig
from secateur.pruner.errors import InvalidSpecError
from secateur.pruner.spec import PruneSpec
from secateur.server.pipeline.job_request import JobRequest

INF, NAN = math.inf, math.nan


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: TrainConfig(learning_rate=INF), "learning_rate"),
        (lambda: TrainConfig(learning_rate=NAN), "learning_rate"),
        (lambda: TrainConfig(learning_rate=-INF), "learning_rate"),
        (lambda: TrainConfig(learning_rate=0.0), "learning_rate"),
        (lambda: TrainConfig(learning_rate=1e6), "learning_rate"),
        (lambda: TrainConfig(learning_rate="0.1"), "learning_rate"),
        (lambda: TrainConfig(momentum=NAN), "momentum"),
        (lambda: TrainConfig(momentum=1.0), "momentum"),
        (lambda: TrainConfig(epochs=10**9), "epochs"),
        (lambda: TrainConfig(epochs=-1), "epochs"),
        (lambda: TrainConfig(batch_size=2**31), "batch_size"),
        (lambda: TrainConfig(batch_size=0), "batch_size"),
        (lambda: TrainConfig(steps_per_epoch=10**12), "steps_per_epoch"),
        (lambda: MeasureConfig(steps=2**31 - 1), "steps"),
        (lambda: MeasureConfig(rounds=10**6), "rounds"),
        (lambda: MeasureConfig(warmup_steps=-1), "warmup_steps"),
        (lambda: MeasureConfig(latency_runs=0), "latency_runs"),
        (lambda: PruneSpec(ratio=INF), "ratio"),
        (lambda: PruneSpec(ratio=NAN), "ratio"),
        (lambda: PruneSpec(head_ratio=INF), "head_ratio"),
        (lambda: PruneSpec(head_ratio=NAN), "head_ratio"),
        (lambda: PruneSpec(round_to=2**31 - 1), "round_to"),
        (lambda: PruneSpec(min_channels=10**12), "min_channels"),
        (lambda: PruneSpec(seed=-1), "seed"),
        (lambda: PruneSpec(seed=2**64), "seed"),
        (lambda: JobRequest("m.keras", "out", ratios=(0.2, NAN)), "ratios"),
        (lambda: JobRequest("m.keras", "out", ratios=tuple([0.1] * 65)), "ratios"),
        (lambda: JobRequest("m.keras", "out", max_accuracy_drop=NAN, eval_data="e"), None),
        (lambda: JobRequest("m.keras", "out", max_accuracy_drop=INF, eval_data="e"), None),
        (lambda: JobRequest("m.keras", "out", max_accuracy_drop=-0.1, eval_data="e"), None),
        (lambda: JobRequest("m.keras", "out", version=0), "version"),
    ],
)
def test_outOfRangeNumbers_raiseInvalidSpecErrorNamingTheField(make, field) -> None:
    with pytest.raises(InvalidSpecError) as info:
        make()
    field = field or "max_accuracy_drop"
    assert info.value.field == field
    assert field in str(info.value) and "Received:" in str(info.value)


def test_defaultsAndEdgesWithinRange_areAccepted() -> None:
    TrainConfig(epochs=0, learning_rate=10.0, momentum=0.0, batch_size=65_536)
    MeasureConfig(warmup_steps=0, steps=1, rounds=1, latency_runs=1)
    PruneSpec(ratio=0.0, round_to="auto", min_channels=1, seed=2**63 - 1)
    JobRequest("m.keras", "out", ratios=tuple([0.1] * 64), max_accuracy_drop=0.0, eval_data="e")


def test_hugeEchoedValue_isCutInTheMessage() -> None:
    with pytest.raises(InvalidSpecError) as info:
        TrainConfig(learning_rate="9" * 100_000)
    assert len(str(info.value)) < 400 and "more chars" in str(info.value)
