"""A job's wall-time limit (issue 18, item 7): the spec's ``max_run_seconds``, at most
the server's ``--max-job-seconds``; a job past it is stopped and ends FAILED
DEADLINE_EXCEEDED. Every replica limit is a flag with a default in ``--help``."""

from __future__ import annotations

import subprocess
import time

import grpc
import pytest

from secateur.client.schema import FIELDS_BY_KEY
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .test_serve_hardening import SERVE, Served


def _spec(models, **extra) -> pb.JobSpec:
    return pb.JobSpec(
        model_uri=str(models / "m.keras"),
        output_uri=str(models / f"out-{time.monotonic_ns()}"),
        pruning=pb.PruningSpec(ratio=0.3),
        **extra,
    )


def test_everyLimitIsAFlagWithADefault_inHelp() -> None:
    for prog in ("main", "worker_main"):
        code = f"import secateur.server.main as m; raise SystemExit(m.{prog}(['--help']))"
        out = subprocess.run(
            [SERVE[0], "-c", code], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        flat = " ".join(out.split())
        for flag in ("--max-model-bytes", "--max-job-seconds"):
            assert flag in flat and "default" in flat.split(flag, 2)[-1][:400], (prog, flag)
        if prog == "main":
            for flag in ("--max-concurrent-plans", "--max-queued-jobs"):
                assert flag in flat, flag
    # The spec key and the CLI flag come from the one schema (client/schema.py).
    assert FIELDS_BY_KEY["max_run_seconds"].flag == "--max-run-seconds"


def test_jobPastItsWallTime_endsFailedDeadlineExceeded_andAboveTheMaximumIsRefused(
    tmp_path,
) -> None:
    models = tmp_path / "state" / "models"
    models.mkdir(parents=True)
    (models / "m.keras").write_bytes(b"TensorFlow takes longer than the limit to import")
    s = Served(tmp_path, "--max-job-seconds", "600")
    try:
        s.wait_serving()
        stub = pbg.PruningServiceStub(s.channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateJob(pb.CreateJobRequest(spec=_spec(models, max_run_seconds=601)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-job-seconds" in err.value.details()
        started = time.monotonic()
        job = stub.CreateJob(pb.CreateJobRequest(spec=_spec(models, max_run_seconds=2)))
        while job.state in (pb.Job.STATE_QUEUED, pb.Job.STATE_RUNNING):
            assert time.monotonic() - started < 120, job
            time.sleep(0.2)
            job = stub.GetJob(pb.GetJobRequest(name=job.name), timeout=30)
        assert job.state == pb.Job.STATE_FAILED, job
        assert job.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], job.error
        assert "wall-time limit of 2 s" in job.error.message
        assert job.attempts == 1
    finally:
        s.close()
