"""The embedded server runs its jobs through the worker loop, as PostgreSQL's workers do:
one claim, lease, progress, fence, conclude and cancel path (issue 18)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc

from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.server.jobstore.sqlite import SqliteJobStore
from secateur.server.workers.loop import WorkerLoop
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

Job = pb.Job
ENDED = (Job.STATE_SUCCEEDED, Job.STATE_FAILED, Job.STATE_CANCELLED)


def _wait(stub: pbg.PruningServiceStub, name: str, states: tuple[int, ...]) -> Job:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(name=name))
        if job.state in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"{name} still {Job.State.Name(job.state)}: {job.message}")


def test_embeddedServer_claimsLeasesAndCancelsThroughTheWorkerLoop(
    digits_data, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    opts = ServerOptions(
        state_dir=str(tmp_path / "state"),
        port=0,
        allowed_prefixes=(str(digits_data.root), str(out)),
    )
    with BackgroundServer(opts) as server:
        manager = server.running.manager
        assert manager is not None and isinstance(manager.store, SqliteJobStore)
        assert isinstance(manager.worker_loop, WorkerLoop)
        worker = manager.worker_loop.cfg.worker_id
        stub = pbg.PruningServiceStub(grpc.insecure_channel(server.target))
        spec = pb.JobSpec(
            model_uri=digits_data.model_path,
            output_uri=str(out),
            pruning=pb.PruningSpec(ratio=0.3),
            training=pb.TrainingSpec(
                epochs=50, train_data=digits_data.train_glob, eval_data=digits_data.eval_file
            ),
        )
        job = stub.CreateJob(pb.CreateJobRequest(spec=spec))
        running = _wait(stub, job.name, (Job.STATE_RUNNING, *ENDED))
        job_id = job.name.removeprefix("jobs/")
        assert running.state == Job.STATE_RUNNING and running.worker == worker
        assert running.HasField("lease_expire_time") and running.attempts == 1
        assert manager.store.live_leases([job_id]) == {job_id: 1}  # claimed under token 1
        stub.CancelJob(pb.CancelJobRequest(name=job.name))
        done = _wait(stub, job.name, ENDED)
        assert done.state == Job.STATE_CANCELLED, done.message
        assert manager.store.live_leases([job_id]) == {}  # the loop concluded it
        assert not os.path.exists(out / "1")  # a cancelled job publishes nothing
