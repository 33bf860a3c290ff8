"""Issue 18, item 2, with no next attempt: a ``gs://`` publish killed partway by an end
that is final (the job's wall time, the preemption cap) leaves no half version and
no staging; a complete version it published ends the job SUCCEEDED.

The real worker loop (server/workers/loop.py) runs real job processes
(server/workers/job_process.py, with the pruning replaced by a stand-in that
publishes a ready version through the real publish_version and fence, so no
TensorFlow is needed) on a real SQLite store, publishing to the GCS emulator; each
job process is stopped at the exact point meant with server/holds.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from secateur.server.holds import HOLD_ENV
from secateur.server.jobstore.records import JobRecord, JobState, now_ns
from secateur.server.jobstore.sqlite import SqliteJobStore
from secateur.server.pipeline.publish import write_marker
from secateur.server.storage import Storage
from secateur.server.storage.backend import PUBLICATION_MARKER
from secateur.server.workers.loop import LoopConfig, WorkerLoop
from secateur.server.workers.spawn import WorkerRunner
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg
from tests.server import test_scaleout as scaleout
from tests.server.conftest import free_port
from tests.server.test_scaleout import CLI, ENDED, Cluster, create, spec, wait_for

#: The job process with its pruning replaced: it publishes the ready version argv[1].
STANDIN = """
import sys
from secateur.server.pipeline import prune_job
from secateur.server.pipeline.publish import publish_version
from secateur.server.workers import job_process

class Standin:
    def __init__(self, request, storage, on_event, cancelled, fence=None, job_id="", **kw):
        self.request, self.storage, self.fence, self.job_id = request, storage, fence, job_id

    def run(self):
        uri = publish_version(self.storage, sys.argv[1], self.request.output_uri, None,
                              job_id=self.job_id, fence=self.fence)
        return {"output_uri": uri}

prune_job.PruneJob = Standin
sys.exit(job_process.main(sys.argv[2:]))
"""
tiny_model = scaleout.tiny_model  # the fixture (module scope), for the slow test
JOB = "0123456789abcdef"
OTHER = "fedcba9876543210"


def _version(root: Path, job: str = "") -> str:
    """A ready version (a stand-in SavedModel and its report), marked as ``job``'s if given."""
    (root / "variables").mkdir(parents=True)
    (root / "saved_model.pb").write_bytes(b"graph")
    (root / "variables" / "variables.index").write_bytes(b"index")
    (root / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(4096))
    (root / "assets.extra" / "secateur").mkdir(parents=True)
    report = {"decision": "published", "pruned": {"params": 7}}
    (root / "assets.extra" / "secateur" / "report.json").write_text(json.dumps(report))
    if job:
        write_marker(str(root), job)
    return str(root)


def _blobs(client: Any, bucket: str) -> set[str]:
    return {b.name for b in client.list_blobs(bucket, prefix="out/")}


def _run(tmp_path: Path, bucket: str, point: str, cfg: LoopConfig, wall_s: float = 0) -> JobRecord:
    """Run the job until ``point`` holds it; with no wall time, stop the worker there
    (a scale-down); its final record."""
    holds = tmp_path / "holds"
    holds.mkdir()
    (holds / point).touch()
    os.environ[HOLD_ENV] = str(holds)  # the job process inherits it (removed by the fixture)
    store = SqliteJobStore(str(tmp_path / "state"))
    spec = pb.JobSpec(model_uri=f"gs://{bucket}/m.keras", output_uri=f"gs://{bucket}/out")
    if wall_s:
        spec.max_run_seconds = wall_s
    store.insert(JobRecord(JOB, spec.SerializeToString(), JobState.QUEUED, create_ns=now_ns()))
    command = (sys.executable, "-c", STANDIN, _version(tmp_path / "version"))
    runner = WorkerRunner(command, str(tmp_path / "state"), None, grace_s=1.0)
    loop = WorkerLoop(cfg, store, runner)

    async def main() -> None:
        task = asyncio.create_task(loop.run())
        deadline = time.monotonic() + 60
        while (record := store.get(JOB)) is None or record.state is not JobState.SUCCEEDED:
            if record is not None and record.state in (JobState.FAILED, JobState.CANCELLED):
                break
            if not wall_s and (holds / f"{point}.reached").exists():
                loop.stop()  # SIGTERM's first step: hand the job back
                break
            assert time.monotonic() < deadline, record
            await asyncio.sleep(0.05)
        loop.stop()
        await asyncio.wait_for(task, 60)

    try:
        asyncio.run(main())
        assert (holds / f"{point}.reached").exists()  # killed right there, not before
        final = store.get(JOB)
    finally:
        store.close()
    assert final is not None
    return final


@pytest.fixture
def others(gcs_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Another job's complete version 1 and its staging: never touched."""
    monkeypatch.setenv(HOLD_ENV, "")
    storage = Storage()
    storage.publish_dir(_version(tmp_path / "theirs", OTHER), f"gs://{gcs_bucket}/out", 1)
    storage.write_bytes(f"gs://{gcs_bucket}/out/.tmp-{OTHER}-0/saved_model.pb", b"theirs")
    return {f"out/.tmp-{OTHER}-0/saved_model.pb"} | {
        f"out/1/{rel}" for rel in storage.checksums(f"gs://{gcs_bucket}/out/1")
    }


def test_wallTimeKillsThePublishBeforeSavedModelPb_jobFailsAndLeavesNoHalfVersion(
    gcs_bucket: str, gcs_client: Any, others: set[str], tmp_path: Path
) -> None:
    cfg = LoopConfig("w1", lease_s=30, idle_poll_s=0.1)
    final = _run(tmp_path, gcs_bucket, "before_pb", cfg, wall_s=5)
    assert final.state is JobState.FAILED and final.error is not None, final
    assert final.error.code is grpc.StatusCode.DEADLINE_EXCEEDED, final.error
    assert "wall-time limit of 5 s" in final.error.message
    assert f"gs://{gcs_bucket}/out/2) was incomplete and was removed" in final.error.message
    assert _blobs(gcs_client, gcs_bucket) == others  # no version 2, no staging of ours


def test_wallTimeKillsTheJobAfterAComplete_publish_jobSucceedsFromIt(
    gcs_bucket: str, gcs_client: Any, others: set[str], tmp_path: Path
) -> None:
    cfg = LoopConfig("w1", lease_s=30, idle_poll_s=0.1)
    final = _run(tmp_path, gcs_bucket, "published", cfg, wall_s=5)
    assert final.state is JobState.SUCCEEDED and final.error is None, final
    assert final.result is not None and final.result["pruned"] == {"params": 7}
    assert final.result["output_uri"] == f"gs://{gcs_bucket}/out/2"
    mine = _blobs(gcs_client, gcs_bucket) - others
    assert f"out/2/{PUBLICATION_MARKER}" in mine and "out/2/saved_model.pb" in mine
    assert all(name.startswith("out/2/") for name in mine)  # its staging is gone


def test_preemptionCapStopsThePublishBeforeSavedModelPb_jobFailsAndLeavesNoHalfVersion(
    gcs_bucket: str, gcs_client: Any, others: set[str], tmp_path: Path
) -> None:
    cfg = LoopConfig("w1", lease_s=30, idle_poll_s=0.1, max_preemptions=1)
    final = _run(tmp_path, gcs_bucket, "before_pb", cfg)
    assert final.state is JobState.FAILED and final.error is not None, final
    assert final.error.code is grpc.StatusCode.ABORTED, final.error
    assert "--max-preemptions" in final.error.message
    assert "was incomplete and was removed" in final.error.message
    assert _blobs(gcs_client, gcs_bucket) == others


def _half_version(storage: Storage, tmp_path: Path, uri: str) -> None:
    """What a publish of JOB killed before its saved_model.pb leaves: the marker and
    every other file under ``uri``, and its staging beside it."""
    local = _version(tmp_path / "half", JOB)
    for folder, _, names in os.walk(local):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), local)
            data = Path(folder, name).read_bytes()
            storage.write_bytes(f"{uri.rsplit('/', 1)[0]}/.tmp-{JOB}-0/{rel}", data)
            if rel != "saved_model.pb":
                storage.write_bytes(f"{uri}/{rel}", data)


@pytest.mark.parametrize("cancel", [False, True], ids=["attemptsSpent", "cancelPending"])
def test_storeGivesUpAJobWhoseWorkerDiedMidPublish_itsHalfVersionIsRemoved(
    gcs_bucket: str, gcs_client: Any, others: set[str], tmp_path: Path, cancel: bool
) -> None:
    """The worker died (SIGKILL, node lost) during the publish: its lease runs out and the
    next claim finds the job's attempts spent (or its cancel pending), so the job does
    not run again; the claiming worker still settles the version its fence recorded."""
    store = SqliteJobStore(str(tmp_path / "state"))
    spec = pb.JobSpec(model_uri=f"gs://{gcs_bucket}/m.keras", output_uri=f"gs://{gcs_bucket}/out")
    store.insert(JobRecord(JOB, spec.SerializeToString(), JobState.QUEUED, create_ns=now_ns()))
    uri = f"gs://{gcs_bucket}/out/2"
    claim = store.claim("w0", 0.5, 1)
    assert claim is not None and store.fence(JOB, claim.token, 0.1, uri)
    _half_version(Storage(), tmp_path, uri)
    if cancel:
        store.request_cancel(JOB)
    time.sleep(0.6)  # w0's lease runs out
    runner = WorkerRunner(("false",), str(tmp_path / "state"), None, grace_s=1.0)
    loop = WorkerLoop(LoopConfig("w1", max_attempts=1, idle_poll_s=0.1), store, runner)

    async def main() -> None:
        task = asyncio.create_task(loop.run())
        deadline = time.monotonic() + 30
        while (record := store.get(JOB)) is None or record.state is JobState.RUNNING:
            assert time.monotonic() < deadline, record
            await asyncio.sleep(0.05)
        loop.stop()
        await asyncio.wait_for(task, 30)

    try:
        asyncio.run(main())
        final = store.get(JOB)
    finally:
        store.close()
    assert final is not None and final.error is not None, final
    want = (JobState.CANCELLED, "CANCELLED") if cancel else (JobState.FAILED, "ABORTED")
    assert (final.state, final.error.code.name) == want, final
    assert "(gs://" in final.error.message and "was incomplete and was removed" in final.message
    assert final.attempts == 1  # it did not run again
    assert _blobs(gcs_client, gcs_bucket) == others


@pytest.mark.slow  # a real TensorFlow job held until its 75 s wall time (~80 s)
def test_realServe_wallTimeKillsItsGcsPublishBeforeSavedModelPb_noHalfVersion(
    gcs_bucket: str, gcs_client: Any, tmp_path: Path, tiny_model: str
) -> None:
    """The same end to end: ``secateur serve`` (embedded store) runs a real pruning job
    publishing to the emulator, its wall time stops it at ``before_pb``."""
    model = tiny_model
    local = Cluster("", tmp_path, model)
    port = free_port()
    try:
        local._start("serve", [
            *CLI, "serve", "--port", str(port), "--metrics-port", "-1",
            "--state-dir", str(tmp_path / "state"), "--max-concurrent-jobs", "1",
            "--allowed-uri-prefix", f"gs://{gcs_bucket}", "--allowed-uri-prefix", model,
            "--shutdown-grace-seconds", "0",
        ])  # fmt: skip
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=90)
        api = pbg.PruningServiceStub(channel)
        local.arm("before_pb")
        job_spec = spec(local, "out")
        job_spec.output_uri, job_spec.max_run_seconds = f"gs://{gcs_bucket}/out", 75
        job = create(api, job_spec)
        local.reached("before_pb", timeout=70)
        assert "out/1/saved_model.pb" not in _blobs(gcs_client, gcs_bucket)
        assert any(n.startswith("out/1/") for n in _blobs(gcs_client, gcs_bucket))  # half
        done = wait_for(api, job.name, lambda j: j.state in ENDED, 120)
        assert done.state == pb.Job.STATE_FAILED, done
        assert done.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], done.error
        assert "was incomplete and was removed" in done.error.message
        assert _blobs(gcs_client, gcs_bucket) == set()  # no version, staging or checkpoints
    finally:
        local.stop()


def test_removeStaging_localToo_onlyTheJobsOwn(tmp_path: Path) -> None:
    """A local publish SIGKILLed mid-copy leaves ``.tmp-<job>-<uuid>/`` beside the
    versions; settling removes that and nothing of another job or another publish."""
    base = tmp_path / "out"
    for name in (f".tmp-{JOB}-1", f".tmp-{OTHER}-2", ".tmp-0123", "1"):
        (base / name).mkdir(parents=True)
        (base / name / "saved_model.pb").write_bytes(b"x")
    removed = Storage().remove_staging(str(base), JOB)
    assert removed == [str(base / f".tmp-{JOB}-1")]
    assert sorted(os.listdir(base)) == [".tmp-0123", f".tmp-{OTHER}-2", "1"]
