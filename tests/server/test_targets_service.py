"""Targets through the service on loopback (issue 20): bad combinations are
INVALID_ARGUMENT naming the request's field path, before any work; a params
and FLOPs target job meets both exactly and reports wanted, predicted and
measured in its result and to Prometheus; an unreachable target ends
FAILED_PRECONDITION with the best reached; a step-time target on a tiny model
(slow) is met within the stated tolerance or fails with the best reached."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from secateur.client.protospec import report_from_job
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


def test_planPruning_paramsTarget_planMeetsItAndReportsIt(stub, digits_data) -> None:
    request = pb.PlanPruningRequest(
        model_uri=digits_data.model_path, pruning=pb.PruningSpec(targets=pb.TargetSpec(params=0.5))
    )
    resp = stub.PlanPruning(request, timeout=240)
    assert resp.params_after <= 0.5 * resp.params_before
    (target,) = resp.plan["targets"]
    assert target["metric"] == "params" and target["met"]
    assert target["measured"] == resp.params_after / resp.params_before


def _watch(stub, spec: pb.JobSpec, timeout: float = 300) -> pb.Job:
    job = stub.CreateJob(pb.CreateJobRequest(spec=spec))
    return list(stub.WatchJob(pb.WatchJobRequest(name=job.name), timeout=timeout))[-1]


# Two jobs through real worker processes and a real Prometheus: ~1 min on the
# busy 2-core machine, the one end-to-end target job of the default run.
def test_job_paramsAndFlopsTargets_metExactly_reportedInResultAndPrometheus(
    digits_data, tmp_path
) -> None:
    from .prometheus_fixture import run_prometheus

    out = tmp_path / "out"
    opts = ServerOptions(
        state_dir=str(tmp_path / "state"), port=0, metrics_port=0,
        allowed_prefixes=(str(digits_data.root), str(out)),
    )  # fmt: skip
    with BackgroundServer(opts) as server:
        stub = pbg.PruningServiceStub(grpc.insecure_channel(server.target))
        spec = _spec(digits_data, str(out), targets=pb.TargetSpec(params=0.5, flops=0.6))
        done = _watch(stub, spec)
        assert done.state == Job.STATE_SUCCEEDED, done.error.message
        r = done.result
        by = {t.metric: t for t in r.targets}
        assert set(by) == {"params", "flops"}
        params = r.plan["params_after"] / r.plan["params_before"]
        flops = r.plan["flops_after"] / r.plan["flops_before"]
        # Counted from the plan: exactly the pruned model's figures, within the limit.
        assert by["params"].measured == params <= 0.5 and by["flops"].measured == flops <= 0.6
        assert by["params"].remeasured == r.pruned.params / r.original.params == params
        assert by["flops"].remeasured == r.pruned.flops / r.original.flops == flops
        assert all(t.met and t.HasField("predicted") for t in r.targets)
        assert "counted" in by["params"].how["method"]
        shown = {t["metric"]: t for t in report_from_job(done)["targets"]}
        assert shown["params"]["measured"] == params and shown["flops"]["met"]
        channels = [g for g in r.plan["groups"] if g["kind"] == "channels"]
        prunable = sum(g["size_before"] for g in channels if not g["frozen"])
        removed = sum(g["size_before"] - g["size_after"] for g in channels)
        assert r.candidates[0].ratio == round(removed / prunable, 6) > 0  # the share removed
        # An unreachable target: FAILED_PRECONDITION with the best reached.
        spec.output_uri = str(out / "never")
        spec.pruning.targets.Clear()
        spec.pruning.targets.max_params = 10
        failed = _watch(stub, spec)
        assert failed.state == Job.STATE_FAILED
        assert failed.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "params target" in failed.error.message and "best reached" in failed.error.message
        with run_prometheus([f"127.0.0.1:{server.metrics_port}"], tmp_path / "prom") as prom:

            def one(q: str) -> float:
                return prom.wait_for(q)[0].value

            for t in r.targets:
                for figure in ("wanted", "predicted", "measured", "remeasured"):
                    q = f'secateur_target_fraction{{metric="{t.metric}",figure="{figure}"}}'
                    assert abs(one(q) - getattr(t, figure)) < 1e-12, q
                assert one(f'secateur_target_met{{metric="{t.metric}"}}') == 1


@pytest.mark.slow  # profiles 2 groups x 4 widths, each compiled and timed: minutes on 2 cores
def test_job_stepTimeTarget_tinyModel_measuredWithinToleranceOrBestReached(tmp_path) -> None:
    import keras

    layers = keras.layers
    inputs = keras.Input((24, 24, 3))
    x = inputs
    for i in range(2):
        x = layers.Conv2D(96, 3, padding="same", name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(10, activation="softmax", name="head")(x))
    (tmp_path / "models").mkdir()
    path = str(tmp_path / "models" / "tiny.keras")
    model.save(path)
    out = tmp_path / "out"
    opts = ServerOptions(
        state_dir=str(tmp_path / "state"), port=0,
        allowed_prefixes=(str(tmp_path / "models"), str(out)),
    )  # fmt: skip
    tolerance = 0.15  # the stated noise: the median of 8 interleaved steps on a busy CPU
    spec = pb.JobSpec(
        model_uri=path, output_uri=str(out),
        pruning=pb.PruningSpec(
            targets=pb.TargetSpec(step_time=0.7, tolerance=tolerance, corrections=2), round_to=8
        ),
        training=pb.TrainingSpec(epochs=0, batch_size=16, measure_steps=2),
    )  # fmt: skip
    with BackgroundServer(opts) as server:
        stub = pbg.PruningServiceStub(grpc.insecure_channel(server.target))
        done = _watch(stub, spec, timeout=1200)
    if done.state == Job.STATE_FAILED:  # the device could not be made fast enough: say how close
        assert done.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "best reached" in done.error.message
        return
    assert done.state == Job.STATE_SUCCEEDED, done.error.message
    (t,) = done.result.targets
    assert t.metric == "step_time" and t.met and t.measured <= 0.7 * (1 + tolerance)
    assert t.how["device"].startswith("CPU") and t.how["profile_measurements"] > 0
    assert t.how["profile_processes"] >= 1  # measured in child processes of the job
    assert t.HasField("predicted") and t.HasField("remeasured")
    assert list((tmp_path / "state" / "profiles").glob("costs-*.json"))  # cached for next time
