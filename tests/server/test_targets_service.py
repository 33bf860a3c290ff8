"""Targets through the service on loopback (issue 20): bad combinations are
INVALID_ARGUMENT naming the request's field path, before any work."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .test_service import _violations

Job = pb.Job


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("targets") / "out")


@pytest.fixture(scope="module")
def stub(digits_data, out) -> Iterator[pbg.PruningServiceStub]:
    opts = ServerOptions(
        state_dir=out + "-state", port=0, allowed_prefixes=(str(digits_data.root), out)
    )
    with BackgroundServer(opts) as s:
        channel = grpc.insecure_channel(s.target)
        yield pbg.PruningServiceStub(channel)
        channel.close()


def _spec(digits_data, out: str, **pruning: Any) -> pb.JobSpec:
    return pb.JobSpec(
        model_uri=digits_data.model_path,
        output_uri=out,
        pruning=pb.PruningSpec(**pruning),
        training=pb.TrainingSpec(epochs=0, batch_size=64, measure_steps=1),
    )


@pytest.mark.parametrize(
    ("pruning", "path"),
    [
        ({"ratio": 0.3, "targets": pb.TargetSpec(params=0.5)}, "spec.pruning.ratio"),
        ({"ratios": [0.2, 0.4], "targets": pb.TargetSpec(flops=0.5)}, "spec.pruning.ratios"),
        (
            {"scope": pb.SCOPE_LAYERWISE, "targets": pb.TargetSpec(params=0.5)},
            "spec.pruning.scope",
        ),
        (
            {"iterative_steps": 2, "targets": pb.TargetSpec(params=0.5)},
            "spec.pruning.iterative_steps",
        ),
        ({"targets": pb.TargetSpec(step_time=1.5)}, "spec.pruning.targets.step_time"),
        ({"targets": pb.TargetSpec(params=0.5, max_params=100)}, "spec.pruning.targets.max_params"),
        (
            {"targets": pb.TargetSpec(latency=0.5, latency_ms=2.0)},
            "spec.pruning.targets.latency_ms",
        ),
        ({"targets": pb.TargetSpec(max_flops=0)}, "spec.pruning.targets.max_flops"),
        (
            {"targets": pb.TargetSpec(step_time=0.5, tolerance=0.9)},
            "spec.pruning.targets.tolerance",
        ),
        ({"targets": pb.TargetSpec(tolerance=0.1)}, "spec.pruning.targets"),  # no target at all
    ],
)
def test_createJob_badTargetCombination_invalidArgumentNamingThePath(
    stub, digits_data, out, pruning: dict[str, Any], path: str
) -> None:
    before = len(stub.ListJobs(pb.ListJobsRequest(page_size=1000)).jobs)
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateJob(pb.CreateJobRequest(spec=_spec(digits_data, out, **pruning)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(info.value) == [path]
    assert "Received:" in info.value.details()
    assert len(stub.ListJobs(pb.ListJobsRequest(page_size=1000)).jobs) == before
