"""head_ratio through the service on loopback: PlanPruning lists head groups by
kind, a job prunes heads, an out-of-range head_ratio is refused naming the field."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest

from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from ..attention_models import image_attention_model
from .test_service import _violations

Job = pb.Job


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("heads")
    model = root / "models" / "attn.keras"
    model.parent.mkdir()
    image_attention_model().save(str(model))
    return {"root": str(root), "model": str(model), "out": str(root / "out")}


@pytest.fixture(scope="module")
def stub(digits_data, paths) -> Iterator[pbg.PruningServiceStub]:
    opts = ServerOptions(
        state_dir=paths["root"] + "/state",
        port=0,
        allowed_prefixes=(str(digits_data.root), paths["root"] + "/models", paths["out"]),
    )
    with BackgroundServer(opts) as s:
        yield pbg.PruningServiceStub(grpc.insecure_channel(s.target))


def test_planPruning_headGroupsHaveTheirKind(stub, paths) -> None:
    request = pb.PlanPruningRequest(
        model_uri=paths["model"], pruning=pb.PruningSpec(ratio=0.0, head_ratio=0.5)
    )
    resp = stub.PlanPruning(request, timeout=120)
    [heads] = [g for g in resp.groups if g.kind == "heads"]
    assert (list(heads.origins), heads.size_before, heads.size_after) == (["mha:heads"], 4, 2)
    assert {g.kind for g in resp.groups} == {"heads", "channels"}
    assert resp.params_after < resp.params_before


def test_job_headRatio_prunesHeads(stub, digits_data, paths) -> None:
    spec = pb.JobSpec(
        model_uri=paths["model"],
        output_uri=paths["out"],
        pruning=pb.PruningSpec(ratio=0.2, head_ratio=0.5, criterion=pb.CRITERION_L1),
        training=pb.TrainingSpec(
            epochs=0, batch_size=64, eval_data=digits_data.eval_file, measure_steps=1
        ),
    )
    job = stub.CreateJob(pb.CreateJobRequest(spec=spec))
    done = list(stub.WatchJob(pb.WatchJobRequest(name=job.name), timeout=240))[-1]
    assert done.state == Job.STATE_SUCCEEDED, done.error.message
    plan = done.result.plan
    assert plan["spec"]["head_ratio"] == 0.5
    heads = [g for g in plan["groups"] if g["kind"] == "heads"]
    assert [(g["size_before"], g["size_after"]) for g in heads] == [(4, 2)]
    assert done.result.pruned.params < done.result.original.params


@pytest.mark.parametrize("value", [1.0, -0.5, math.nan, math.inf])
def test_headRatioOutOfRange_invalidArgumentNamingTheField(stub, paths, value) -> None:
    spec = pb.JobSpec(
        model_uri=paths["model"],
        output_uri=paths["out"],
        pruning=pb.PruningSpec(head_ratio=value),
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateJob(pb.CreateJobRequest(spec=spec))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(info.value) == ["spec.pruning.head_ratio"]
    assert "head_ratio must be" in info.value.details()
    plan = pb.PlanPruningRequest(model_uri=paths["model"], pruning=spec.pruning)
    with pytest.raises(grpc.RpcError) as info:
        stub.PlanPruning(plan, timeout=120)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(info.value) == ["pruning.head_ratio"]
