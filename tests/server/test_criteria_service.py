"""The lamp and taylor criteria through the service on loopback: taylor
without train_data is refused at request time, with it a job runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .test_service import _violations

Job = pb.Job


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("criteria") / "out")


@pytest.fixture(scope="module")
def stub(digits_data, out) -> Iterator[pbg.PruningServiceStub]:
    root = Path(out).parent
    opts = ServerOptions(
        state_dir=str(root / "state"),
        port=0,
        allowed_prefixes=(str(digits_data.root), out),
    )
    with BackgroundServer(opts) as s:
        yield pbg.PruningServiceStub(grpc.insecure_channel(s.target))


def _spec(data, out: str, **training) -> pb.JobSpec:
    t = {"epochs": 0, "batch_size": 64, "eval_data": data.eval_file, "measure_steps": 1} | training
    return pb.JobSpec(
        model_uri=data.model_path,
        output_uri=out,
        pruning=pb.PruningSpec(ratio=0.3, criterion=pb.CRITERION_TAYLOR, taylor_batches=2),
        training=pb.TrainingSpec(**t),
    )


def test_taylor_withoutTrainData_invalidArgumentOnTheCriterion(stub, digits_data, out) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateJob(pb.CreateJobRequest(spec=_spec(digits_data, out)))
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "taylor" in err.details() and "train_data" in err.details()
    assert _violations(err) == ["spec.pruning.criterion"]
    plan = pb.PlanPruningRequest(
        model_uri=digits_data.model_path, pruning=_spec(digits_data, out).pruning
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.PlanPruning(plan, timeout=120)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(info.value) == ["pruning.criterion"]


def test_lamp_planPruning_scoresEveryPrunedGroupByLamp(stub, digits_data) -> None:
    pruning = pb.PruningSpec(ratio=0.5, criterion=pb.CRITERION_LAMP)
    resp = stub.PlanPruning(
        pb.PlanPruningRequest(model_uri=digits_data.model_path, pruning=pruning), timeout=120
    )
    pruned = [g for g in resp.groups if g.size_after < g.size_before]
    assert len(pruned) > 1 and {g.criterion for g in pruned} == {"lamp"}


def test_taylor_jobWithTrainData_succeedsScoredByTaylor(stub, digits_data, out) -> None:
    spec = _spec(digits_data, out, train_data=digits_data.train_glob)
    job = stub.CreateJob(pb.CreateJobRequest(spec=spec))
    done = list(stub.WatchJob(pb.WatchJobRequest(name=job.name), timeout=240))[-1]
    assert done.state == Job.STATE_SUCCEEDED, done.error.message
    plan = done.result.plan
    assert plan["spec"]["criterion"] == "taylor" and plan["spec"]["taylor_batches"] == 2
    criteria = {g["criterion"] for g in plan["groups"] if g["size_after"] < g["size_before"]}
    assert criteria == {"taylor"}
    assert done.result.pruned.params < done.result.original.params
