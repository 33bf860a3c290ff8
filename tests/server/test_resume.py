"""Jobs resume after preemption (issue 21, part 2): checkpoints in the job's work area.

A real ``secateur worker`` is stopped (SIGTERM, as a KEDA scale-down or a
spot node's shutdown does) while the job fine-tunes the second candidate of
a sweep; the next worker's attempt loads the finished candidate and the
fine-tuning state from the checkpoints instead of redoing them, and the job
ends as an uninterrupted run of the same spec does, bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from secateur.server.pipeline.checkpoint import EVERY_ENV, WORK_DIR, tuned_point
from secateur.v1 import pruning_pb2 as pb
from tests.server.test_scaleout import (
    ENDED,
    QUEUED,
    SUCCEEDED,
    Cluster,
    create,
    get,
    published,
    wait_for,
)

REPORT = Path("assets.extra", "secateur", "report.json")


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path, digits_data) -> Cluster:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train-0.tfrecord", "eval.tfrecord"):  # 700 training examples: 6 steps
        shutil.copy(digits_data.root / name, data / name)
    c = Cluster(pg_url, tmp_path, digits_data.model_path)
    try:
        yield c  # type: ignore[misc]
    finally:
        c.stop()


def _spec(cluster: Cluster, out: str) -> pb.JobSpec:
    data = cluster.root / "data"
    return pb.JobSpec(
        model_uri=cluster.model,
        output_uri=str(cluster.root / out),
        pruning=pb.PruningSpec(ratios=[0.25, 0.5], seed=7),
        max_accuracy_drop=1.0,  # the largest ratio is published
        training=pb.TrainingSpec(
            epochs=2,
            batch_size=128,
            train_data=str(data / "train-0.tfrecord"),
            eval_data=str(data / "eval.tfrecord"),
            measure_steps=1,
        ),
    )


def _weights(version: Path) -> list[np.ndarray]:
    from secateur.pruner.modelio import load_model

    return [np.asarray(v) for v in load_model(str(version)).weights]


@pytest.mark.slow  # two workers, two jobs of two candidates each: about a minute on two cores
def test_sigtermWhileTuningSecondCandidate_resumes_sameResultAsUninterrupted(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = cluster.replica("api")
    resumed = create(api, _spec(cluster, "resumed"))
    straight = create(api, _spec(cluster, "straight"))
    point = tuned_point(1, 1)  # candidate 1 (ratio 0.5), after epoch 1 of 2
    cluster.arm(point)
    monkeypatch.setenv(EVERY_ENV, "0")  # a fine-tuning checkpoint after every epoch
    cluster.worker("w1")
    cluster.reached(point, 240)
    job_id = resumed.name.removeprefix("jobs/")
    area = cluster.root / "resumed" / WORK_DIR / job_id
    manifest = json.loads((area / "manifest.json").read_text())
    assert sorted(manifest["candidates"]) == ["0"]
    assert (manifest["tuning"]["candidate"], manifest["tuning"]["epochs_done"]) == (1, 1)

    cluster.procs["w1"].terminate()  # the scale-down: the job is handed back mid-epoch-2
    assert cluster.procs["w1"].wait(timeout=60) == 0
    back = get(api, resumed.name)
    assert back is not None and (back.state, back.attempts) == (QUEUED, 1), back
    assert (area / "manifest.json").exists()  # a hand-back keeps the checkpoints

    cluster.release(point)  # w2 goes through that point without stopping
    cluster.worker("w2")
    jobs = [wait_for(api, j.name, lambda j: j.state in ENDED, 300) for j in (resumed, straight)]
    assert [j.state for j in jobs] == [SUCCEEDED] * 2, [j.error.message for j in jobs]
    first, second = jobs
    assert (first.attempts, first.result.resumed) == (2, 1)
    assert list(first.result.resumed_from) == [
        "attempt 2: candidates [0.25] done; ratio 0.5 fine-tuning from epoch 1"
    ]
    assert (second.result.resumed, list(second.result.resumed_from)) == (0, [])

    a = json.loads((cluster.root / "resumed" / "1" / REPORT).read_text())
    b = json.loads((cluster.root / "straight" / "1" / REPORT).read_text())
    # The resumed attempt trained one epoch (candidate 1's second); the straight run four.
    assert a["resumed"]["epochs_trained"] == 1 and b["resumed"]["epochs_trained"] == 4
    assert a["resumed"]["from"][0]["fine_tuning"] == {
        "ratio": 0.5, "candidate": 1, "round": 0, "epochs_done": 1,
    }  # fmt: skip
    for x, y in zip(a["candidates"], b["candidates"], strict=True):
        assert (x["ratio"], x["plan"], x["history"]) == (y["ratio"], y["plan"], y["history"])
        assert x["accuracy"] == y["accuracy"]
    assert a["selected_ratio"] == b["selected_ratio"] == 0.5
    for x, y in zip(
        _weights(cluster.root / "resumed" / "1"),
        _weights(cluster.root / "straight" / "1"),
        strict=True,
    ):
        assert np.array_equal(x, y)  # bit-identical
    # Checkpoints go when the job ends: only the version is left.
    assert published(cluster, "resumed") == ["1"] and published(cluster, "straight") == ["1"]
