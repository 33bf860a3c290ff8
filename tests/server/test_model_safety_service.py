"""A model file that would run code, sent to a real server on loopback and to
`secateur prune`: refused as INVALID_ARGUMENT / exit 2, and its code never runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from secateur.cli.outcome import EXIT_BAD_INPUT
from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .. import hostile_models as hm


@dataclass(frozen=True)
class Hostile:
    root: Path
    model: str
    marker: Path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Hostile:
    """The issue's repro: a tf.keras SavedModel whose Lambda writes a marker."""
    root = tmp_path_factory.mktemp("hostile-service")
    marker = root / "pwn"
    model = hm.tf_keras_lambda(str(root / "model"), str(marker), "tf")
    assert not marker.exists()
    return Hostile(root, model, marker)


@pytest.fixture(scope="module")
def stub(hostile: Hostile) -> Iterator[pbg.PruningServiceStub]:
    opts = ServerOptions(
        state_dir=str(hostile.root / "state"), port=0, allowed_prefixes=(str(hostile.root),)
    )
    with BackgroundServer(opts) as server, grpc.insecure_channel(server.target) as channel:
        yield pbg.PruningServiceStub(channel)


def _spec(h: Hostile) -> pb.JobSpec:
    return pb.JobSpec(
        model_uri=h.model,
        output_uri=str(h.root / "out"),
        pruning=pb.PruningSpec(ratio=0.3),
        training=pb.TrainingSpec(epochs=0),
    )


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_planPruning_lambdaSavedModel_invalidArgument_noCodeRuns(stub, hostile) -> None:
    req = pb.PlanPruningRequest(model_uri=hostile.model, pruning=pb.PruningSpec(ratio=0.5))
    err = _refused(lambda: stub.PlanPruning(req, timeout=120))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'m/inner/evil'" in err.details() and "Lambda" in err.details()
    assert "Received: " in err.details()
    assert not hostile.marker.exists()


def test_createJob_validateOnly_lambdaSavedModel_invalidArgument_noCodeRuns(stub, hostile) -> None:
    req = pb.CreateJobRequest(spec=_spec(hostile), validate_only=True)
    err = _refused(lambda: stub.CreateJob(req, timeout=120))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "Lambda" in err.details()
    assert not hostile.marker.exists()
    assert not stub.ListJobs(pb.ListJobsRequest()).jobs


def test_createJob_lambdaSavedModel_jobFailsInvalidArgument_noCodeRuns(stub, hostile) -> None:
    name = stub.CreateJob(pb.CreateJobRequest(spec=_spec(hostile))).name
    deadline = time.time() + 180
    job = stub.GetJob(pb.GetJobRequest(name=name))
    while job.state not in (pb.Job.STATE_SUCCEEDED, pb.Job.STATE_FAILED, pb.Job.STATE_CANCELLED):
        assert time.time() < deadline, job
        time.sleep(0.5)
        job = stub.GetJob(pb.GetJobRequest(name=name))
    assert job.state == pb.Job.STATE_FAILED
    assert job.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], job.error
    assert "Lambda" in job.error.message
    assert not hostile.marker.exists()
    assert not (hostile.root / "out").exists()


def test_cliPrune_lambdaSavedModel_exit2_noCodeRuns(hostile, tmp_path) -> None:
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "secateur.cli", "prune", hostile.model, str(out)]
    proc = subprocess.run(
        [*cmd, "--ratio", "0.3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "'m/inner/evil'" in proc.stderr and "Traceback" not in proc.stderr
    assert not hostile.marker.exists()
    assert not out.exists()
