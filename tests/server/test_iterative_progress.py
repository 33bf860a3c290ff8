"""Job progress of an iterative candidate: monotonic across its rounds (issue 12 §3)."""

from __future__ import annotations

import pytest

from secateur.pruner.config import MeasureConfig, TrainConfig
from secateur.pruner.spec import PruneSpec
from secateur.server.pipeline.job_request import (
    CANDIDATE_STAGES,
    JobRequest,
    overall_progress,
    sweep_progress,
)
from secateur.server.pipeline.prune_job import PruneJob
from secateur.server.storage import Storage


def test_sweepProgress_countingRounds_fillsTheCandidateBlockInOrder() -> None:
    # Candidate 1 of 2, three rounds: round j is 1 * 3 + j of 2 * 3, every stage in run order.
    seen = [
        sweep_progress(stage, 3 + j, 6, frac)
        for j in range(3)
        for stage in CANDIDATE_STAGES
        for frac in (0.0, 0.5, 1.0)
    ]
    assert seen == sorted(seen)  # exact: a stage's end is the next one's start
    assert seen[0] == pytest.approx(0.5) and seen[-1] == pytest.approx(1.0)
    assert sweep_progress("SCORING", 4, 6) == pytest.approx(0.5 + 0.5 / 3)
    assert sweep_progress("FINE_TUNING", 0, 2, 0.5) == pytest.approx((0.2 + 0.7 * 0.5) / 2)


@pytest.mark.slow
def test_iterativeJob_progressNeverStepsBack(digits_data, tmp_path) -> None:
    req = JobRequest(
        model_uri=digits_data.model_path,
        output_uri=str(tmp_path / "out"),
        spec=PruneSpec(iterative_steps=3),
        ratios=(0.2, 0.4),
        train=TrainConfig(epochs=1, steps_per_epoch=2, batch_size=64),
        train_data=digits_data.train_glob,
        eval_data=digits_data.eval_file,
        measure=MeasureConfig(warmup_steps=0, steps=1, rounds=1, latency_runs=1),
    )
    events = []
    report = PruneJob(req, Storage(), events.append).run()
    assert all(len(c["rounds"]) == 3 for c in report["candidates"])
    overall = [overall_progress(e.stage, e.progress) for e in events]
    assert overall == sorted(overall), [(e.stage, e.message, e.progress) for e in events]
    rounds = {e.message for e in events if e.stage == "FINE_TUNING"}
    assert {"ratio 0.4, round 3/3", "ratio 0.2, round 2/3"} <= rounds
    tuning = [e.progress for e in events if e.stage in CANDIDATE_STAGES]
    assert tuning[-1] == pytest.approx(1.0 - (1 - 0.9) / 3 / 2)  # the last EVALUATING
