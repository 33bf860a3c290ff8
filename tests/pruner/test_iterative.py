"""Iterative pruning schedules (issue 12 §3): per-round ratios of the remaining channels."""

from __future__ import annotations

import math

import pytest

from secateur.pruner.errors import InvalidSpecError
from secateur.pruner.spec import PruneSpec


@pytest.mark.parametrize("schedule", ["linear", "geometric"])
def test_roundRatios_cumulativeShareFollowsTheSchedule_endsAtRatio(schedule) -> None:
    spec = PruneSpec(ratio=0.6, iterative_steps=3, iterative_schedule=schedule)
    steps = spec.round_ratios()
    left = [math.prod(1 - r for r in steps[: j + 1]) for j in range(3)]
    if schedule == "linear":  # 0.2, 0.4, 0.6 of the original removed
        assert left == pytest.approx([0.8, 0.6, 0.4])
    else:  # the same fraction of what remains each round
        assert steps == pytest.approx([1 - 0.4 ** (1 / 3)] * 3)
    assert left[-1] == pytest.approx(0.4)


def test_roundRatios_oneStepIsTheRatioItself_andSettingsValidated() -> None:
    assert PruneSpec(ratio=0.3).round_ratios() == (0.3,)
    with pytest.raises(InvalidSpecError, match="iterative_steps") as exc:
        PruneSpec(iterative_steps=0)
    assert exc.value.field == "iterative_steps"
    with pytest.raises(InvalidSpecError, match="iterative_schedule must be one of linear"):
        PruneSpec(iterative_schedule="cosine")
    spec = PruneSpec.from_dict({"iterative_steps": 2, "iterative_schedule": "geometric"})
    assert PruneSpec.from_dict(spec.to_dict()) == spec
