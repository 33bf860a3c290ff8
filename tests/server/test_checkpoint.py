"""The checkpoint store of a job's work area (server/pipeline/checkpoint.py), on a local
directory and on GCS (the emulator): what a resumed attempt reads back, what it ignores,
and that nothing is left once the job ends. No TensorFlow: fine-tuning states are arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from secateur.pruner.epoch_data import TrainState
from secateur.server.pipeline.checkpoint import (
    WORK_DIR,
    Checkpoints,
    discard,
    every_s,
    work_area,
)
from secateur.server.storage import Storage
from secateur.v1 import pruning_pb2 as pb

SPEC = b"spec-one"


def _state(done: int) -> TrainState:
    rng = np.random.default_rng(done)
    variables = [rng.standard_normal((3, 4)).astype("float32"), np.array([done], "int64")]
    return TrainState(done, variables, [np.float32(done) * np.ones(4, "float32")], {"loss": [0.5]})


def _open(storage: Storage, out: str, attempt: int, spec: bytes = SPEC) -> Checkpoints:
    area = work_area(storage, out, "job-1")
    return Checkpoints(storage, area, Checkpoints.fingerprint_of(spec), attempt, (), 0.0)


def _tuned(storage: Storage, out: str, epochs: int) -> None:
    first = _open(storage, out, 1)
    after = first.on_epoch(0.5, 1, 0)
    for done in range(1, epochs + 1):
        after(done, lambda done=done: _state(done))


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_tuningState_readBackExactly_resumeRecorded_thenRemoved(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if where == "gcs":
        bucket = request.getfixturevalue("gcs_bucket")
        storage = Storage(gcs_client=request.getfixturevalue("gcs_client"))
        out = f"gs://{bucket}/models/out"
    else:
        storage, out = Storage([str(tmp_path)]), str(tmp_path / "out")
    _tuned(storage, out, epochs=2)
    second = _open(storage, out, 2)
    assert second.tuning(0, 0) is None and second.tuning(1, 1) is None  # another candidate/round
    state = second.tuning(1, 0)
    want = _state(2)
    assert state is not None and state.epochs_done == 2 and state.history == {"loss": [0.5]}
    for got, expected in zip(state.variables + state.optimizer, want.variables + want.optimizer):
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
    second.begin()
    assert second.report() == {
        "times": 1,
        "from": [{
            "attempt": 2, "candidates_done": [],
            "fine_tuning": {"ratio": 0.5, "candidate": 1, "round": 0, "epochs_done": 2},
            "text": "attempt 2: candidates [] done; ratio 0.5 fine-tuning from epoch 2",
        }],
        "epochs_trained": 0,
    }  # fmt: skip
    assert _open(storage, out, 3).report()["times"] == 1  # the count is stored, not in memory
    area = work_area(storage, out, "job-1")
    names = sorted(loc.name for loc in storage.find(area.child("*")))
    assert names == ["manifest.json", "tune-1-0-2.npz"]  # the epoch-1 state was replaced
    second.remove()
    assert not storage.exists(area)
    if where == "local":
        assert not (tmp_path / "out" / WORK_DIR).exists()  # the hidden dir goes with its last area


def test_manifestOfAnotherSpec_isIgnored(tmp_path: Path) -> None:
    storage, out = Storage([str(tmp_path)]), str(tmp_path / "out")
    _tuned(storage, out, epochs=1)
    other = _open(storage, out, 2, spec=b"spec-two")
    assert other.tuning(1, 0) is None
    other.begin()
    assert other.report()["times"] == 0  # nothing to resume from: a fresh start


def test_unfinishedWriteOfALaterEpoch_previousCheckpointStands(tmp_path: Path) -> None:
    storage, out = Storage([str(tmp_path)]), str(tmp_path / "out")
    _tuned(storage, out, epochs=1)
    area = work_area(storage, out, "job-1")
    storage.write_bytes(area.child("tune-1-0-2.npz"), b"killed while writing")  # not in manifest
    state = _open(storage, out, 2).tuning(1, 0)
    assert state is not None and state.epochs_done == 1


def test_discard_byTheWorkerLoop_removesTheArea(tmp_path: Path) -> None:
    storage, out = Storage([str(tmp_path)]), str(tmp_path / "out")
    _tuned(storage, out, epochs=1)
    spec = pb.JobSpec(model_uri="m.keras", output_uri=out).SerializeToString()
    discard(spec, "job-1", [str(tmp_path)])
    assert not (tmp_path / "out" / WORK_DIR).exists()
    discard(spec, "job-1", [str(tmp_path)])  # ending twice is fine


def test_checkpointInterval_fromTheEnvironment() -> None:
    assert every_s({}) == 300.0
    assert every_s({"SECATEUR_CHECKPOINT_SECONDS": "0"}) == 0.0
    with pytest.raises(ValueError, match="must be a number of seconds"):
        every_s({"SECATEUR_CHECKPOINT_SECONDS": "soon"})


def test_jobThatFails_removesItsCheckpoints(tmp_path: Path) -> None:
    from secateur.pruner import PruneSpec
    from secateur.server.pipeline.prune_job import JobRequest, PruneJob
    from secateur.server.storage import StorageNotFoundError

    storage, out = Storage([str(tmp_path)]), str(tmp_path / "out")
    _tuned(storage, out, epochs=1)  # an earlier attempt's checkpoint
    request = JobRequest(str(tmp_path / "gone.keras"), out, PruneSpec(ratio=0.5))
    with pytest.raises(StorageNotFoundError):  # the model is gone: the job ends FAILED
        PruneJob(request, storage, checkpoints=_open(storage, out, 2)).run()
    assert not (tmp_path / "out" / WORK_DIR).exists()
