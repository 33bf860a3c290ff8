"""PruningClient: retries, errors, streams, paging.

What the server says (codes, messages, field violations) is checked against a
real server on loopback; the in-memory fake serves what a real one cannot do
on demand (UNAVAILABLE on the n next calls, slow answers, broken streams,
each job outcome).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from secateur.client.client import (
    ClientError,
    PruningClient,
    job_name,
    parse_state,
    service_config,
)
from secateur.client.protospec import job_spec_from_options, report_from_job
from secateur.v1 import pruning_pb2
from tests.client.fake_server import FakePruningService, FakeServer

Job = pruning_pb2.Job


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as s:
        yield s


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Secateur server on loopback (no jobs run: the calls here are refused)."""
    from secateur.server.api.service import BackgroundServer, ServerOptions

    state = Path(tmp_path_factory.mktemp("client-real")) / "state"
    with BackgroundServer(ServerOptions(state_dir=str(state), port=0)) as s:
        yield s.target


@pytest.fixture
def client(server: FakeServer) -> Iterator[PruningClient]:
    with PruningClient(server.target, timeout=5.0, backoff=0.001) as c:
        yield c


def _spec(**opts: object) -> pruning_pb2.JobSpec:
    return job_spec_from_options("/m/model.keras", "/served", {"ratio": 0.3, **opts})


# -- protospec -------------------------------------------------------------------


def test_jobSpecFromOptions_mapsEveryField() -> None:
    opts = {
        "ratio": 0.3,
        "ratios": (0.1, 0.5),
        "criterion": "l1",
        "scope": "layerwise",
        "round_to": 8,
        "min_channels": 2,
        "exclude": ["conv1", "fc"],
        "reload_weights": False,
        "seed": 7,
        "epochs": 3,
        "batch_size": 64,
        "learning_rate": 0.02,
        "train_data": "gs://b/train-*",
        "eval_data": "gs://b/eval",
        "image_key": "img",
        "label_key": "y",
        "resize": True,
        "measure_steps": 5,
        "max_accuracy_drop": 0.01,
        "version": 4,
    }
    spec = job_spec_from_options("gs://b/m.keras", "gs://b/out", opts)
    p, t = spec.pruning, spec.training
    assert (spec.model_uri, spec.output_uri, spec.version) == ("gs://b/m.keras", "gs://b/out", 4)
    assert p.ratio == 0.3 and list(p.ratios) == [0.1, 0.5]
    assert p.criterion == pruning_pb2.CRITERION_L1 and p.scope == pruning_pb2.SCOPE_LAYERWISE
    assert (p.round_to, p.min_channels, p.seed, p.reload_weights) == (8, 2, 7, False)
    assert list(p.exclude) == ["conv1", "fc"]
    assert (t.epochs, t.batch_size, t.learning_rate, t.measure_steps) == (3, 64, 0.02, 5)
    assert (t.train_data, t.eval_data, t.image_key, t.label_key, t.resize) == (
        "gs://b/train-*",
        "gs://b/eval",
        "img",
        "y",
        True,
    )
    assert spec.HasField("max_accuracy_drop") and spec.max_accuracy_drop == 0.01


def test_jobSpecFromOptions_unsetStaysUnset_andBadValuesNameTheField() -> None:
    spec = job_spec_from_options("m", "o", {"ratio": None, "reload_weights": True})
    assert not spec.HasField("max_accuracy_drop") and spec.pruning.reload_weights
    assert not spec.pruning.HasField("ratio") and not spec.training.HasField("epochs")
    assert spec.pruning.criterion == pruning_pb2.CRITERION_UNSPECIFIED
    with pytest.raises(ValueError, match=r"criterion=.*'l3'"):
        job_spec_from_options("m", "o", {"criterion": "l3"})
    with pytest.raises(ValueError, match="round_to"):
        job_spec_from_options("m", "o", {"round_to": 2.5})
    with pytest.raises(ValueError, match="ratoi"):
        job_spec_from_options("m", "o", {"ratoi": 0.1})
    with pytest.raises(ValueError, match="resize must be true or false"):
        job_spec_from_options("m", "o", {"resize": "yes"})


def test_jobSpecFromOptions_roundingIsOneChoice_bothAtOnceRefused() -> None:
    auto = job_spec_from_options("m", "o", {"round_to": "auto"}).pruning
    assert auto.WhichOneof("rounding") == "round_to_auto" and auto.round_to_auto
    eight = job_spec_from_options("m", "o", {"round_to": 8, "round_to_auto": False}).pruning
    assert eight.WhichOneof("rounding") == "round_to" and eight.round_to == 8
    for both in (
        {"round_to": 8, "round_to_auto": True},
        {"round_to": "auto", "round_to_auto": True},
    ):
        with pytest.raises(ValueError, match="round_to and round_to_auto are exclusive"):
            job_spec_from_options("m", "o", both)


def test_reportFromJob_matchesTheLocalReportShape(client: PruningClient) -> None:
    job = client.prune("/m/model.keras", "/served", {"ratios": [0.2, 0.5]})
    report = report_from_job(job)
    assert report["output_uri"] == "/served/1" and report["selected_ratio"] == 0.5
    assert [c["ratio"] for c in report["candidates"]] == [0.2, 0.5]
    original = report["original"]
    assert original["params"] == 1_000_000 and isinstance(original["params"], int)
    assert isinstance(original["train_step_seconds"], float)
    assert original["how"]["batch_size"] == 128 and isinstance(original["how"]["batch_size"], int)
    assert report["candidates"][1]["plan"]["groups"] == [[0, 1, 3]]
    assert report["pruned"]["params"] == 250_000 and report["plan"]["spec"]["ratio"] == 0.5
    assert report["state"] == "SUCCEEDED" and report["error"] is None


def test_reportFromJob_unmeasuredIsNone() -> None:
    job = Job(name="jobs/x", state=Job.STATE_SUCCEEDED)
    c = job.result.candidates.add(ratio=0.3)
    c.metrics.params = 5
    job.result.original.params = 10
    report = report_from_job(job)
    assert report["original"]["peak_memory_bytes"] is None
    assert report["original"]["accuracy"] is None
    assert report["candidates"][0]["accuracy_drop"] is None
    assert report["output_uri"] is None and report["pruned"] is None


# -- unary calls -----------------------------------------------------------------


def test_create_sameRequestId_returnsTheSameJob(client: PruningClient) -> None:
    first = client.create(_spec(), request_id="abc")
    again = client.create(_spec(ratio=0.5), request_id="abc")
    assert first.name == again.name and again.request_id == "abc"
    other = client.create(_spec())
    assert other.name != first.name and other.request_id  # a generated id


def test_serviceConfig_retriesUnavailableOnEveryUnaryMethod() -> None:
    config = json.loads(service_config(retries=9, backoff=0.2))
    (method_config,) = config["methodConfig"]
    policy = method_config["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert policy["maxAttempts"] == 5 and policy["initialBackoff"] == "0.200s"  # gRPC's cap
    methods = {n["method"] for n in method_config["name"]}
    assert methods == {"CreateJob", "GetJob", "ListJobs", "CancelJob", "PlanPruning"}


def test_create_retriesUnavailable_withTheSameRequestId(server: FakeServer) -> None:
    server.service.fail_next(2, "CreateJob")
    with PruningClient(server.target, backoff=0.01, retries=4) as c:
        job = c.create(_spec())
    calls = [r for m, r, _ in server.service.calls if m == "CreateJob"]
    assert len(calls) == 3 and len({r.request_id for r in calls}) == 1
    assert job.request_id == calls[0].request_id


def test_retriesZero_callsOnce(server: FakeServer) -> None:
    server.service.fail_next(1, "GetJob")
    with PruningClient(server.target, retries=0) as c, pytest.raises(ClientError) as info:
        c.get("jobs/any")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.attempts == 1
    assert server.service.count("GetJob") == 1


def test_unavailable_afterAllRetries_raisesWithTheAttempts(server: FakeServer) -> None:
    server.service.fail_next(10, "GetJob")
    with (
        PruningClient(server.target, backoff=0.0, retries=2) as c,
        pytest.raises(ClientError) as info,
    ):
        c.get("jobs/any")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.attempts == 3
    assert server.service.count("GetJob") == 3


def test_invalidArgument_fieldViolationsParsed(real_server: str) -> None:
    with PruningClient(real_server) as c, pytest.raises(ClientError) as info:
        c.create(_spec(ratio=1.5))
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.attempts == 1
    assert "Received: ratio=1.5" in err.details
    assert [f for f, _ in err.field_violations] == ["spec.pruning.ratio"]
    assert "spec.pruning.ratio" in str(err)


def test_invalidArgument_isNotRetried(server: FakeServer) -> None:
    server.service.fail_next(1, "CreateJob", grpc.StatusCode.INVALID_ARGUMENT)
    with PruningClient(server.target, retries=4) as c, pytest.raises(ClientError):
        c.create(_spec())
    assert server.service.count("CreateJob") == 1


def test_validateOnly_createsNothing(server: FakeServer, client: PruningClient) -> None:
    job = client.create(_spec(), validate_only=True)
    assert job.name == "" and job.spec.pruning.ratio == 0.3
    assert list(client.list()) == []


def test_token_sentAsBearerMetadata_onEveryCall() -> None:
    service = FakePruningService(token="s3cret")
    with FakeServer(service) as server:
        with PruningClient(server.target, backoff=0.0) as anonymous:
            with pytest.raises(ClientError) as info:
                anonymous.create(_spec())
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert service.count("CreateJob") == 1  # not retried
        with PruningClient(server.target, token="s3cret") as c:
            job = c.prune("/m/model.keras", "/served", {"ratio": 0.3})
            c.get(job.name)
            list(c.list())
            c.cancel(job.name)
            c.plan("/m/model.keras", {"ratio": 0.5})
    authed = service.calls[1:]
    assert {m for m, _, _ in authed} >= {"CreateJob", "WatchJob", "GetJob", "ListJobs"}
    assert all(md.get("authorization") == "Bearer s3cret" for _, _, md in authed)


def test_deadline_boundsAllAttempts_andIsNotRetried(server: FakeServer) -> None:
    server.service.delays = {"GetJob": 0.3, "CreateJob": 0.3}
    with PruningClient(server.target, timeout=0.05, retries=3, backoff=0.0) as c:
        with pytest.raises(ClientError) as info:
            c.get("jobs/x")
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(ClientError) as info:
            c.create(_spec())
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.service.count("GetJob") == 1 and server.service.count("CreateJob") == 1


def test_notFound_isAClientError(real_server: str) -> None:
    with PruningClient(real_server) as c, pytest.raises(ClientError) as info:
        c.get("nope")
    err = info.value
    assert err.code == grpc.StatusCode.NOT_FOUND and err.details.endswith("Received: 'jobs/nope'")


def test_list_followsPages_newestFirst_andFiltersByState(client: PruningClient) -> None:
    names = [client.create(_spec()).name for _ in range(7)]
    jobs = list(client.list(page_size=3))
    assert [j.name for j in jobs] == names[::-1]
    client.cancel(names[2])
    client.cancel(names[4])
    cancelled = list(client.list("cancelled", page_size=1))
    assert [j.name for j in cancelled] == [names[4], names[2]]
    assert list(client.list(Job.STATE_RUNNING)) == []
    with pytest.raises(ValueError, match="state must be one of"):
        list(client.list("done"))


def test_list_isLazy_onePagePerRequest(server: FakeServer, client: PruningClient) -> None:
    for _ in range(5):
        client.create(_spec())
    it = client.list(page_size=2)
    next(it)
    assert server.service.count("ListJobs") == 1


def test_cancel_endsAQueuedJob_andLeavesAFinishedOneAlone(client: PruningClient) -> None:
    job = client.create(_spec())
    cancelled = client.cancel(job.name)
    assert cancelled.state == Job.STATE_CANCELLED
    assert cancelled.error.code == grpc.StatusCode.CANCELLED.value[0]
    done = client.prune("/m/model.keras", "/served", {"ratio": 0.2})
    assert client.cancel(done.name).state == Job.STATE_SUCCEEDED


def test_plan_returnsTheDryRun(client: PruningClient) -> None:
    spec = pruning_pb2.PruningSpec(ratio=0.5)
    response = client.plan("/m/model.keras", spec)
    assert response.params_before == 1000 and response.params_after == 250
    assert response.groups[0].origins == ["conv1"]


# -- streams and prune -----------------------------------------------------------


def test_watch_yieldsEveryStage_untilTerminal(client: PruningClient) -> None:
    job = client.create(_spec())
    snapshots = list(client.watch(job.name))
    assert snapshots[0].state == Job.STATE_QUEUED and snapshots[-1].state == Job.STATE_SUCCEEDED
    stages = [Job.Stage.Name(s.stage) for s in snapshots if s.state == Job.STATE_RUNNING]
    assert stages == [Job.Stage.Name(s) for s in Job.Stage.values()][1:]
    progress = [s.progress for s in snapshots]
    assert progress == sorted(progress) and progress[-1] == 1.0


def test_watch_reopensABrokenStream(server: FakeServer, client: PruningClient) -> None:
    server.service.watch_breaks = 2
    job = client.create(_spec())
    snapshots = list(client.watch(job.name))
    assert snapshots[-1].state == Job.STATE_SUCCEEDED
    assert server.service.count("WatchJob") == 3
    assert len({s.SerializeToString() for s in snapshots}) == len(snapshots)  # no repeats


def test_watch_givesUp_whenTheStreamKeepsBreaking(server: FakeServer) -> None:
    server.service.fail_next(10, "WatchJob")
    with (
        PruningClient(server.target, retries=2, backoff=0.0) as c,
        pytest.raises(ClientError) as info,
    ):
        list(c.watch("jobs/x"))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert server.service.count("WatchJob") == 3


def test_watch_unknownJob_raisesNotFound(client: PruningClient) -> None:
    with pytest.raises(ClientError) as info:
        list(client.watch("jobs/missing"))
    assert info.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "outcome,state,code",
    [
        ("succeeded", Job.STATE_SUCCEEDED, 0),
        ("gate", Job.STATE_FAILED, grpc.StatusCode.FAILED_PRECONDITION.value[0]),
        ("internal", Job.STATE_FAILED, grpc.StatusCode.INTERNAL.value[0]),
        ("cancelled", Job.STATE_CANCELLED, grpc.StatusCode.CANCELLED.value[0]),
    ],
)
def test_prune_wait_returnsTheTerminalJob(
    server: FakeServer, client: PruningClient, outcome: str, state: int, code: int
) -> None:
    server.service.outcome = outcome
    seen: list[pruning_pb2.Job] = []
    job = client.prune("/m/model.keras", "/served", _spec(), on_update=seen.append)
    assert job.state == state and job.error.code == code
    assert seen[0].state == Job.STATE_QUEUED and seen[-1] == job
    assert job.spec.model_uri == "/m/model.keras"


def test_prune_noWait_returnsTheCreatedJob(client: PruningClient) -> None:
    job = client.prune("/m/model.keras", "/served", None, wait=False)
    assert job.state == Job.STATE_QUEUED and job.name.startswith("jobs/")


def test_helpers() -> None:
    assert job_name("abc") == "jobs/abc" and job_name("jobs/abc") == "jobs/abc"
    with pytest.raises(ValueError):
        job_name(" ")
    assert parse_state("running") == Job.STATE_RUNNING and parse_state(None) == 0
    err = ClientError(grpc.StatusCode.INVALID_ARGUMENT, "bad", [("spec.x", "no")])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "spec.x: no" in str(err)


def test_constructorArguments_areChecked() -> None:
    with pytest.raises(ValueError, match="retries"):
        PruningClient("localhost:1", retries=-1)
    c = PruningClient("localhost:1", tls=True, root_certificates=None)  # a secure channel
    c.close()
