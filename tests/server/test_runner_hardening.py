"""The job runner under faults: endless worker output lines, a full state disk,
killed and crashing workers. Whatever happens, the job ends, memory and store
agree, every internal failure names an incident id found in the server log,
and the next job runs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from secateur.server.api.jobs import JobManager, ManagerConfig
from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.server.jobstore.jobs_pb import submission, to_pb
from secateur.server.jobstore.records import TERMINAL, JobRecord, JobState
from secateur.server.jobstore.sqlite import SqliteJobStore
from secateur.server.workers.pipes import lines
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

Job = pb.Job
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
INCIDENT = re.compile(r"incident ([0-9a-f]{12})")

# The real worker, after writing 1 MiB lines to stdout, stderr and its events
# descriptor: what a worker echoing a huge input in a traceback looks like.
CHATTY_WORKER = (
    "import os, runpy, sys\n"
    "print('x' * (1 << 20), flush=True)\n"
    "print('Error ' + 'y' * (1 << 20), file=sys.stderr, flush=True)\n"
    "os.write(int(sys.argv[sys.argv.index('--events-fd') + 1]), b'z' * (1 << 20) + b'\\n')\n"
    "runpy.run_module('secateur.server.workers.job_process', run_name='__main__', alter_sys=True)\n"
)
# The real worker handed a request it cannot parse: an internal error in the worker.
GARBLED_WORKER = (
    "import io, runpy, sys\n"
    "sys.stdin = io.StringIO('{not json')\n"
    "runpy.run_module('secateur.server.workers.job_process', run_name='__main__', alter_sys=True)\n"
)


class FlakyStore(SqliteJobStore):
    """A store whose durable writes fail, like a full disk: ``rules`` maps a
    predicate on the record written to how many more such writes to refuse."""

    def __init__(self, state_dir: str) -> None:
        super().__init__(state_dir)
        self.rules: dict[Callable[[JobRecord], bool], int] = {}

    def save(self, record: JobRecord, durable: bool = True) -> None:
        for when, left in self.rules.items():
            if durable and left > 0 and when(record):
                self.rules[when] = left - 1
                raise sqlite3.OperationalError("database or disk is full")
        super().save(record, durable)


def _spec(digits_data, out: Path) -> pb.JobSpec:
    return pb.JobSpec(
        model_uri=digits_data.model_path,
        output_uri=str(out),
        pruning=pb.PruningSpec(ratio=0.3),
        training=pb.TrainingSpec(epochs=0, eval_data=digits_data.eval_file, measure_steps=1),
    )


def _create(manager: JobManager, spec: pb.JobSpec) -> Any:
    return manager.create(submission(pb.CreateJobRequest(spec=spec)))


def _manager(digits_data, tmp_path: Path, store: SqliteJobStore, **config) -> JobManager:
    cfg = ManagerConfig(
        str(tmp_path / "state"),
        (str(digits_data.root), str(tmp_path / "out")),
        **config,
    )
    return JobManager(cfg, store)


async def _until_ended(manager: JobManager, name: str, timeout: float = 240) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = manager.get(name)
        if job.state in TERMINAL:
            return to_pb(job)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} still {job.state.value}: {job.message}")


async def _until_stored(path: str, job_id: str, state: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with closing(sqlite3.connect(path)) as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row[0] == state:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} is still {Job.State.Name(row[0])} on disk")


def _logged_with(caplog: pytest.LogCaptureFixture, incident: str) -> list[str]:
    return [
        r.getMessage() + (r.exc_text or "") for r in caplog.records if incident in r.getMessage()
    ]


def test_hugeWorkerOutputLines_jobStillEnds_andNextJobRuns(digits_data, tmp_path) -> None:
    async def scenario() -> list[Job]:
        store = SqliteJobStore(str(tmp_path / "state"))
        command = (sys.executable, "-c", CHATTY_WORKER)
        manager = _manager(digits_data, tmp_path, store, worker_command=command)
        await manager.start()
        try:
            spec = _spec(digits_data, tmp_path / "out")
            names = [(await _create(manager, spec)).name for _ in range(2)]
            return [await _until_ended(manager, name) for name in names]
        finally:
            await manager.shutdown()
            store.close()

    jobs = asyncio.run(scenario())
    assert [j.state for j in jobs] == [Job.STATE_SUCCEEDED, Job.STATE_SUCCEEDED], [
        j.message for j in jobs
    ]
    assert sorted(os.listdir(tmp_path / "out")) == ["1", "2"]


def test_storeWriteFailures_areRetried_everyJobEndsOnce_andTheLoopGoesOn(
    digits_data, tmp_path, caplog
) -> None:
    """The worker loop over the embedded store: a claim the store refuses is
    tried again at the next poll, a refused progress write is skipped, a
    refused end is retried within the lease; each job ends SUCCEEDED once,
    in memory and on disk."""
    caplog.set_level(logging.WARNING, "secateur.server")
    state = str(tmp_path / "state")

    async def scenario() -> dict[str, Job]:
        store = FlakyStore(state)
        manager = _manager(digits_data, tmp_path, store)
        await manager.start()
        spec = _spec(digits_data, tmp_path / "out")
        ended: dict[str, Job] = {}
        try:
            # the claim's RUNNING write fails three times
            store.rules = {(lambda j: j.state == JobState.RUNNING): 3}
            job = await _create(manager, spec)
            ended["at_claim"] = await _until_ended(manager, job.name)
            assert list(store.rules.values()) == [0]  # all three refused
            # one job (each costs a worker's TensorFlow start): the write of a
            # stage change fails mid-job, and then its end write fails five times
            store.rules = {
                (lambda j: j.stage == "ANALYZING"): 3,
                (lambda j: j.state in TERMINAL): 5,
            }
            job = await _create(manager, spec)
            ended["mid_job_and_at_end"] = await _until_ended(manager, job.name)
            assert list(store.rules.values())[1] == 0, store.rules  # the end was refused 5 times
        finally:
            await manager.shutdown()
            store.close()
        return ended

    ended = asyncio.run(scenario())
    on_disk = SqliteJobStore(state)
    for case, job in ended.items():
        assert job.state == Job.STATE_SUCCEEDED and job.attempts == 1, (case, job.message)
        assert to_pb(on_disk.get(job.name[5:])).state == Job.STATE_SUCCEEDED, case
    on_disk.close()
    assert sorted(os.listdir(tmp_path / "out")) == ["1", "2"]  # one version each
    assert any("database or disk is full" in r.getMessage() for r in caplog.records)


def test_workerKilled_failsInternalWithIncidentInLog(digits_data, tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, "secateur.server")
    opts = ServerOptions(
        state_dir=str(tmp_path / "state"),
        port=0,
        allowed_prefixes=(str(digits_data.root), str(tmp_path / "out")),
    )
    with BackgroundServer(opts) as server:
        stub = pbg.PruningServiceStub(grpc.insecure_channel(server.target))
        spec = _spec(digits_data, tmp_path / "out")
        spec.training.epochs, spec.training.train_data = 50, digits_data.train_glob
        job = stub.CreateJob(pb.CreateJobRequest(spec=spec))
        for snap in stub.WatchJob(pb.WatchJobRequest(name=job.name), timeout=120):
            if snap.stage == Job.STAGE_FINE_TUNING:
                break
        workers = [
            p
            for p in psutil.Process().children(recursive=True)
            if "secateur.server.workers.job_process" in " ".join(p.cmdline())
        ]
        assert len(workers) == 1
        workers[0].send_signal(signal.SIGKILL)
        final = list(stub.WatchJob(pb.WatchJobRequest(name=job.name), timeout=60))[-1]
    assert final.state == Job.STATE_FAILED and final.error.code == INTERNAL
    assert "signal 9" in final.error.message
    incident = INCIDENT.search(final.error.message).group(1)
    assert _logged_with(caplog, incident)  # with the worker's last output lines


def test_workerInternalError_sameIncidentInOutcomeAndServerLog(
    digits_data, tmp_path, caplog
) -> None:
    caplog.set_level(logging.WARNING, "secateur.server")

    async def scenario() -> Job:
        store = SqliteJobStore(str(tmp_path / "state"))
        command = (sys.executable, "-c", GARBLED_WORKER)
        manager = _manager(digits_data, tmp_path, store, worker_command=command)
        await manager.start()
        try:
            job = await _create(manager, _spec(digits_data, tmp_path / "out"))
            return await _until_ended(manager, job.name)
        finally:
            await manager.shutdown()
            store.close()

    job = asyncio.run(scenario())
    assert job.state == Job.STATE_FAILED and job.error.code == INTERNAL
    assert "Traceback" not in job.error.message and "JSONDecodeError" not in job.error.message
    incident = INCIDENT.search(job.error.message).group(1)
    logged = "\n".join(_logged_with(caplog, incident))
    assert "Traceback" in logged and "JSONDecodeError" in logged  # the worker's own traceback


def test_worker_internalError_printsTracebackWithTheOutcomesIncident(tmp_path) -> None:
    read_fd, write_fd = os.pipe()
    proc = subprocess.run(
        [sys.executable, "-m", "secateur.server.workers.job_process", "--events-fd", str(write_fd)],
        input=b"{not json",
        capture_output=True,
        pass_fds=(write_fd,),
        timeout=60,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as events:
        outcome = json.loads(events.read().splitlines()[-1])
    assert proc.returncode == 1 and outcome["code"] == "INTERNAL"
    assert f"incident {outcome['incident']}" in outcome["message"]
    stderr = proc.stderr.decode()
    assert f"incident {outcome['incident']}" in stderr and "Traceback" in stderr


def test_lines_splitsAnyLengthWithBoundedMemory() -> None:
    async def split(data: bytes, max_len: int) -> list[tuple[bytes, int]]:
        stream = asyncio.StreamReader()
        stream.feed_data(data)
        stream.feed_eof()
        return [item async for item in lines(stream, max_len)]

    huge = b"x" * (3 << 20)  # spans many read chunks
    assert asyncio.run(split(b"a\n" + huge + b"\n\nlast", 10)) == [
        (b"a", 0),
        (b"x" * 10, len(huge) - 10),
        (b"", 0),
        (b"last", 0),
    ]
    assert asyncio.run(split(huge + b"\n", len(huge))) == [(huge, 0)]
