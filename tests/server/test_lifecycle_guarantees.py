"""Issue 18's job-lifecycle guarantees on real processes and a real PostgreSQL.

Replicas and ``secateur worker`` processes as in test_scaleout (its Cluster):
a claim never exceeds ``--max-concurrent-jobs``; a cancel survives a hand-back
and a cancel at publication is never half done (the job process is held at the
exact point with server/holds.py); a short ``--lease-seconds``
still publishes; a job every worker shutdown stops ends FAILED, not queued
forever.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from secateur.server.jobstore.sqlite import SqliteJobStore
from secateur.server.pipeline.checkpoint import WORK_DIR
from secateur.v1 import pruning_pb2 as pb
from tests.server import test_scaleout as scaleout
from tests.server.test_runner_hardening import _create, _manager, _spec, _until_ended
from tests.server.test_scaleout import (
    CANCELLED,
    ENDED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Cluster,
    create,
    get,
    names_and_states,
    published,
    spec,
    wait_for,
)

tiny_model = scaleout.tiny_model  # the fixtures, shared with test_scaleout
cluster = scaleout.cluster
FAILED = pb.Job.STATE_FAILED
MEASURING = pb.Job.STAGE_MEASURING


def test_maxConcurrentOne_twoQueuedJobs_neverTwoRunningAtOnce(cluster: Cluster) -> None:
    api = cluster.replica("api")
    jobs = [create(api, spec(cluster, f"out{i}", measure_steps=30)) for i in range(2)]
    cluster.worker("w1")  # --max-concurrent-jobs 1 (the default)
    most = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        states = [state for _, state in names_and_states(api)]
        most = max(most, states.count(RUNNING))
        if all(state in ENDED for state in states):
            break
        time.sleep(0.1)
    assert most == 1
    assert [get(api, job.name).state for job in jobs] == [SUCCEEDED] * 2  # type: ignore[union-attr]


def test_cancelThenSigterm_jobEndsCancelled_notRerunElsewhere(cluster: Cluster) -> None:
    api = cluster.replica("api")
    cluster.worker("w1")
    job = create(api, spec(cluster, "out", measure_steps=400))
    wait_for(api, job.name, lambda j: j.stage == MEASURING and j.worker == "w1", 120)
    area = cluster.root / "out" / WORK_DIR / job.name.removeprefix("jobs/")
    assert (area / "manifest.json").exists()  # its candidate's checkpoint (docs/resume.md)
    cluster.signal("w1", signal.SIGSTOP)  # the cancel lands before w1 renews its lease
    api.CancelJob(pb.CancelJobRequest(name=job.name), timeout=30)
    cluster.procs["w1"].send_signal(signal.SIGTERM)  # then w1 is stopped: a hand-back
    cluster.signal("w1", signal.SIGCONT)
    assert cluster.procs["w1"].wait(timeout=60) == 0
    cluster.worker("w2")
    done = wait_for(api, job.name, lambda j: j.state in ENDED, 30)
    time.sleep(3)  # w2 had its chance to claim it
    final = get(api, job.name)
    assert final is not None and (final.state, final.attempts) == (CANCELLED, 1), final
    assert done.state == CANCELLED
    assert published(cluster, "out") == []  # nothing published, no checkpoints left


def test_cancelWhileExporting_beforeTheFence_endsCancelled_nothingPublished(
    cluster: Cluster,
) -> None:
    api = cluster.replica("api")
    cluster.arm("exporting")  # the job process waits in EXPORTING, before its last cancel check
    cluster.worker("w1")
    job = create(api, spec(cluster, "out"))
    cluster.reached("exporting")
    wait_for(api, job.name, lambda j: j.stage == pb.Job.STAGE_EXPORTING, 10)
    api.CancelJob(pb.CancelJobRequest(name=job.name), timeout=30)
    cluster.release("exporting")  # the cancel is seen (SIGTERM) or the fence refuses
    started = time.monotonic()
    done = wait_for(api, job.name, lambda j: j.state in ENDED, 60)
    assert time.monotonic() - started < 15  # ended by its worker, not by a lease running out
    assert (done.state, done.attempts) == (CANCELLED, 1), done
    time.sleep(1)
    assert published(cluster, "out") == []


def test_cancelWhileExporting_afterTheFence_endsSucceededWithOneVersion(cluster: Cluster) -> None:
    api = cluster.replica("api")
    cluster.arm("fenced")  # the fence said yes; the version is not published yet
    cluster.worker("w1")
    job = create(api, spec(cluster, "out"))
    cluster.reached("fenced")
    api.CancelJob(pb.CancelJobRequest(name=job.name), timeout=30)
    deadline = time.monotonic() + 15  # w1 sees the cancel and leaves its publish alone
    while "too late" not in cluster.log("w1"):
        assert time.monotonic() < deadline, cluster.log("w1")[-2000:]
        time.sleep(0.2)
    cluster.release("fenced")
    done = wait_for(api, job.name, lambda j: j.state in ENDED, 60)
    assert (done.state, done.attempts) == (SUCCEEDED, 1), done  # too late to cancel: not half
    assert done.result.output_uri == str(cluster.root / "out" / "1")
    assert published(cluster, "out") == ["1"]


def test_leaseOfOneAndAHalfSeconds_jobStillPublishes(cluster: Cluster) -> None:
    api = cluster.replica("api")
    cluster.worker("w1", lease_s=1.5)  # below the 2 s fencing margin: the margin scales
    job = create(api, spec(cluster, "out"))
    done = wait_for(api, job.name, lambda j: j.state in ENDED, 180)
    assert (done.state, done.attempts) == (SUCCEEDED, 1), done.error.message
    assert published(cluster, "out") == ["1"]
    assert "lost its lease" not in cluster.log("w1")


@pytest.mark.slow  # two workers each start TensorFlow and are stopped mid-job
def test_jobPreemptedMaxPreemptionsTimes_endsFailedWithTheReason(cluster: Cluster) -> None:
    api = cluster.replica("api")
    job = create(api, spec(cluster, "out", measure_steps=400))
    for attempt, name in ((1, "w1"), (2, "w2")):
        cluster.worker(name, extra=["--max-preemptions", "2"])
        wait_for(api, job.name, lambda j, n=name: j.state == RUNNING and j.worker == n, 120)
        cluster.procs[name].terminate()  # as a KEDA scale-down does
        assert cluster.procs[name].wait(timeout=60) == 0
        back = get(api, job.name)
        assert back is not None and back.attempts == attempt
        assert back.state == (QUEUED if attempt == 1 else FAILED), back
    assert "stopped 2 times before it finished" in back.error.message
    assert "--max-preemptions" in back.error.message
    assert published(cluster, "out") == []


class FenceStore(SqliteJobStore):
    """The embedded store, its fence check failing ``errors`` times first; ``cancel_first``:
    the job's cancel is requested just before the check (a cancel during EXPORTING)."""

    def __init__(self, state_dir: str, errors: int = 0, cancel_first: bool = False) -> None:
        super().__init__(state_dir)
        self.errors, self.cancel_first, self.asked = errors, cancel_first, 0

    def fence(self, job_id: str, token: int, min_remaining_s: float, uri: str = "") -> bool:
        self.asked += 1
        if self.errors > 0:
            self.errors -= 1
            raise sqlite3.OperationalError("database is locked")
        if self.cancel_first:
            self.request_cancel(job_id)
        return super().fence(job_id, token, min_remaining_s, uri)


def _one_job(digits_data, tmp_path: Path, store: FenceStore) -> pb.Job:
    async def scenario() -> pb.Job:
        manager = _manager(digits_data, tmp_path, store, lease_s=300.0)  # outlives the test
        await manager.start()
        try:
            job = await _create(manager, _spec(digits_data, tmp_path / "out"))
            return await _until_ended(manager, job.name, timeout=120)
        finally:
            await manager.shutdown()
            store.close()

    return asyncio.run(scenario())


def test_fenceCheckFailsTwice_isRetried_jobPublishesOnce(digits_data, tmp_path: Path) -> None:
    store = FenceStore(str(tmp_path / "state"), errors=2)
    done = _one_job(digits_data, tmp_path, store)
    assert (done.state, done.attempts) == (SUCCEEDED, 1), done.message
    assert store.asked == 3
    assert os.listdir(tmp_path / "out") == ["1"]


def test_cancelAtTheFence_endsCancelledAtOnce_nothingPublished(digits_data, tmp_path: Path) -> None:
    store = FenceStore(str(tmp_path / "state"), cancel_first=True)
    done = _one_job(digits_data, tmp_path, store)  # not left RUNNING until its lease runs out
    assert (done.state, done.attempts) == (CANCELLED, 1), done.message
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
