"""The service on loopback: job lifecycle, cancel, idempotency, every error code,
restart recovery, TLS/mTLS, tokens, health and reflection."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.server.jobstore.jobs_pb import from_pb
from secateur.server.jobstore.records import JobState
from secateur.server.jobstore.sqlite import SqliteJobStore
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .conftest import free_port

Job = pb.Job


def _spec(data, out, **training) -> pb.JobSpec:
    t = {"epochs": 0, "batch_size": 64, "eval_data": data.eval_file, "measure_steps": 1} | training
    return pb.JobSpec(
        model_uri=data.model_path,
        output_uri=str(out),
        pruning=pb.PruningSpec(ratio=0.3),
        training=pb.TrainingSpec(**t),
    )


@pytest.fixture
def server(digits_data, tmp_path) -> Iterator[BackgroundServer]:
    opts = ServerOptions(
        state_dir=str(tmp_path / "state"),
        port=0,
        allowed_prefixes=(str(digits_data.root), str(tmp_path / "out")),
        max_queued_jobs=2,
    )
    with BackgroundServer(opts) as s:
        yield s


def _stub(target: str, creds: grpc.ChannelCredentials | None = None) -> pbg.PruningServiceStub:
    channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
    return pbg.PruningServiceStub(channel)


def _wait(
    stub,
    name: str,
    states=(Job.STATE_SUCCEEDED, Job.STATE_FAILED, Job.STATE_CANCELLED),
    timeout=240,
) -> Job:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = stub.GetJob(pb.GetJobRequest(name=name))
        if job.state in states:
            return job
        time.sleep(0.2)
    raise AssertionError(f"{name} still {Job.State.Name(job.state)}")


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _violations(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)
    out = []
    for detail in status.details if status else []:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            out += [v.field for v in br.field_violations]
    return out


def test_job_lifecycle_watchToSuccess_idempotentCreate_list(server, digits_data, tmp_path) -> None:
    stub = _stub(server.target)
    spec = _spec(digits_data, tmp_path / "out")
    job = stub.CreateJob(pb.CreateJobRequest(spec=spec, request_id="ci-build-42"))
    assert job.name.startswith("jobs/") and job.state == Job.STATE_QUEUED
    again = stub.CreateJob(pb.CreateJobRequest(spec=spec, request_id="ci-build-42"))
    assert again.name == job.name
    snapshots = list(stub.WatchJob(pb.WatchJobRequest(name=job.name), timeout=240))
    states = [s.state for s in snapshots]
    assert states[-1] == Job.STATE_SUCCEEDED and Job.STATE_RUNNING in states
    # A watch sends the job as it is after each change it sees, so a stage shorter
    # than one store round trip may be coalesced into the next (ANALYZING is often
    # milliseconds); the stages that last seconds are always seen.
    stages = {s.stage for s in snapshots if s.state == Job.STATE_RUNNING}
    assert {Job.STAGE_MEASURING, Job.STAGE_EXPORTING} <= stages and len(stages) >= 3
    progress = [s.progress for s in snapshots]
    assert progress == sorted(progress) and progress[-1] == 1.0
    done = snapshots[-1]
    assert done.result.output_uri == str(tmp_path / "out" / "1")
    assert os.path.exists(tmp_path / "out" / "1" / "saved_model.pb")
    assert 0 < done.result.pruned.params < done.result.original.params
    assert done.result.pruned.HasField("peak_memory_bytes") and done.result.original.accuracy > 0.5
    assert done.result.plan["spec"]["ratio"] == 0.3 and done.attempts == 1
    assert done.start_time.seconds and done.end_time.seconds
    page = stub.ListJobs(pb.ListJobsRequest(page_size=10))
    assert [j.name for j in page.jobs] == [job.name] and not page.next_page_token
    assert not stub.ListJobs(pb.ListJobsRequest(state=Job.STATE_FAILED)).jobs


def test_lifecycle_logsOneInfoLinePerEvent(server, digits_data, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "secateur.server")
    stub = _stub(server.target)
    spec = _spec(digits_data, tmp_path / "out")
    ran = stub.CreateJob(pb.CreateJobRequest(spec=spec, request_id="logged-1"))
    queued = stub.CreateJob(pb.CreateJobRequest(spec=spec))
    stub.CancelJob(pb.CancelJobRequest(name=queued.name))
    assert _wait(stub, ran.name).state == Job.STATE_SUCCEEDED

    def lines(name: str) -> list[str]:
        job_id = name.removeprefix("jobs/")
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.INFO and r.getMessage().startswith(f"job {job_id}")
        ]

    ran_id = ran.name.removeprefix("jobs/")
    logged = lines(ran.name)
    assert logged[0] == (
        f"job {ran_id} created: {spec.model_uri} -> {spec.output_uri} (request_id logged-1)"
    )
    worker = server.running.manager.worker_loop.cfg.worker_id  # the one runner: the loop
    assert logged[1] == f"job {ran_id} started (attempt 1) on worker {worker}, token 1"
    stages = [line.split("stage ")[1] for line in logged if ": stage " in line]
    assert stages == ["FETCHING", "ANALYZING", "SCORING", "REBUILDING",  # epochs=0: no FINE_TUNING
                      "EVALUATING", "MEASURING", "EXPORTING"]  # fmt: skip
    assert re.fullmatch(rf"job {ran_id} finished: succeeded after [0-9.]+ s \(1 attempt\(s\)\)",
                        logged[-1])  # fmt: skip
    assert len(logged) == 2 + len(stages) + 1  # nothing else, nothing twice
    queued_id = queued.name.removeprefix("jobs/")
    created, cancel, end = lines(queued.name)
    assert created.startswith(f"job {queued_id} created: ")
    assert cancel == f"job {queued_id}: cancel requested while QUEUED"
    assert re.fullmatch(rf"job {queued_id} finished: cancelled CANCELLED after [0-9.]+ s "
                        r"\(0 attempt\(s\)\)", end)  # fmt: skip


def test_missingModel_messageSaysReceivedOnce(server, digits_data, tmp_path) -> None:
    from secateur.server.storage import StorageNotFoundError

    stub = _stub(server.target)
    missing = _spec(digits_data, tmp_path / "out")
    missing.model_uri = str(digits_data.root / "nope.keras")
    calls = [
        lambda: stub.CreateJob(pb.CreateJobRequest(spec=missing)),
        lambda: stub.CreateJob(pb.CreateJobRequest(spec=missing, validate_only=True)),
        lambda: stub.PlanPruning(
            pb.PlanPruningRequest(model_uri=missing.model_uri, pruning=missing.pruning)
        ),
    ]
    for call in calls:
        err = _error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == f"the model must exist. Received: {missing.model_uri}"
    # A caller that ends its message with the URI itself still gets it once.
    again = StorageNotFoundError("the model must exist. Received: nope.keras", "nope.keras")
    assert str(again) == "the model must exist. Received: nope.keras"


def test_cancel_runningAndQueued_leavesNoOutput(server, digits_data, tmp_path) -> None:
    stub = _stub(server.target)
    spec = _spec(digits_data, tmp_path / "out", epochs=50, train_data=digits_data.train_glob)
    first = stub.CreateJob(pb.CreateJobRequest(spec=spec))
    second = stub.CreateJob(pb.CreateJobRequest(spec=spec))
    cancelled = stub.CancelJob(pb.CancelJobRequest(name=second.name))
    assert cancelled.state == Job.STATE_CANCELLED  # queued: at once
    for snap in stub.WatchJob(pb.WatchJobRequest(name=first.name), timeout=120):
        if snap.stage == Job.STAGE_FINE_TUNING:
            break
    stub.CancelJob(pb.CancelJobRequest(name=first.name))
    final = _wait(stub, first.name)
    assert final.state == Job.STATE_CANCELLED
    assert final.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    assert stub.CancelJob(pb.CancelJobRequest(name=first.name)).state == Job.STATE_CANCELLED


def test_errors_mapToCodesWithDetails(server, digits_data, tmp_path) -> None:
    stub = _stub(server.target)
    good = _spec(digits_data, tmp_path / "out")

    bad = pb.JobSpec()
    bad.CopyFrom(good)
    bad.pruning.ratio = 1.5
    err = _error(lambda: stub.CreateJob(pb.CreateJobRequest(spec=bad)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "Received: ratio=1.5" in err.details()
    assert _violations(err) == ["spec.pruning.ratio"]

    missing = pb.JobSpec()
    missing.CopyFrom(good)
    missing.model_uri = str(digits_data.root / "nope.keras")
    assert (
        _error(lambda: stub.CreateJob(pb.CreateJobRequest(spec=missing))).code()
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        _error(lambda: stub.GetJob(pb.GetJobRequest(name="jobs/none"))).code()
        == grpc.StatusCode.NOT_FOUND
    )
    err = _error(lambda: stub.GetJob(pb.GetJobRequest(name="none")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and _violations(err) == ["name"]

    outside = pb.JobSpec()
    outside.CopyFrom(good)
    outside.output_uri = "/etc/secateur-out"
    assert (
        _error(lambda: stub.CreateJob(pb.CreateJobRequest(spec=outside))).code()
        == grpc.StatusCode.PERMISSION_DENIED
    )

    (tmp_path / "out" / "1").mkdir(parents=True)
    (tmp_path / "out" / "1" / "saved_model.pb").write_bytes(b"x")
    taken = pb.JobSpec()
    taken.CopyFrom(good)
    taken.version = 1
    assert (
        _error(lambda: stub.CreateJob(pb.CreateJobRequest(spec=taken))).code()
        == grpc.StatusCode.ALREADY_EXISTS
    )

    scan = digits_data.root / "scan_savedmodel"
    _unsupported_savedmodel(str(scan))
    err = _error(lambda: stub.PlanPruning(pb.PlanPruningRequest(model_uri=str(scan)), timeout=120))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "Cumsum" in err.details()


def test_planPruning_dryRun(server, digits_data) -> None:
    resp = _stub(server.target).PlanPruning(
        pb.PlanPruningRequest(model_uri=digits_data.model_path, pruning=pb.PruningSpec(ratio=0.5)),
        timeout=120,
    )
    assert resp.params_after < resp.params_before and resp.flops_after < resp.flops_before
    assert any(g.size_after < g.size_before for g in resp.groups)
    assert any("touches model input" in r for g in resp.groups for r in g.frozen_reasons)
    assert resp.plan["model_name"] == "digits_vgg"


def test_queueFull_resourceExhausted_andValidateOnlyCreatesNothing(
    server, digits_data, tmp_path
) -> None:
    stub = _stub(server.target)
    spec = _spec(digits_data, tmp_path / "out", epochs=50, train_data=digits_data.train_glob)
    checked = stub.CreateJob(pb.CreateJobRequest(spec=spec, validate_only=True), timeout=120)
    assert not checked.name and not stub.ListJobs(pb.ListJobsRequest()).jobs
    names = [stub.CreateJob(pb.CreateJobRequest(spec=spec)).name for _ in range(3)]
    # one running (after it leaves the queue) + two queued fill max_queued_jobs=2
    _wait(stub, names[0], states=(Job.STATE_RUNNING,))
    err = _error(lambda: stub.CreateJob(pb.CreateJobRequest(spec=spec)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for name in names:
        stub.CancelJob(pb.CancelJobRequest(name=name))


def test_internalError_tracebackLoggedNotSent(server, caplog) -> None:
    def boom(name):
        raise RuntimeError("secret internal detail")

    server.running.manager.get = boom  # type: ignore[method-assign]
    err = _error(lambda: _stub(server.target).GetJob(pb.GetJobRequest(name="jobs/x")))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in err.details() and "incident" in err.details()


def test_tokens_requiredExceptForHealth(digits_data, tmp_path) -> None:
    opts = ServerOptions(state_dir=str(tmp_path / "s"), port=0, tokens=frozenset({"t0k3n"}))
    with BackgroundServer(opts) as s:
        channel = grpc.insecure_channel(s.target)
        stub = pbg.PruningServiceStub(channel)
        err = _error(lambda: stub.ListJobs(pb.ListJobsRequest()))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "missing" in err.details()
        err = _error(
            lambda: stub.ListJobs(pb.ListJobsRequest(), metadata=[("authorization", "Bearer nope")])
        )
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid" in err.details()
        stub.ListJobs(pb.ListJobsRequest(), metadata=[("authorization", "Bearer t0k3n")])
        streamed = stub.WatchJob(pb.WatchJobRequest(name="jobs/x"))
        assert _error(lambda: list(streamed)).code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.SERVING
        )


def _certs(tmp_path) -> dict[str, bytes]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=test-ca")  # fmt: skip
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")  # fmt: skip
        (tmp_path / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
            "-extfile", f"{name}.ext")  # fmt: skip
    return {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix in (".pem", ".key")}


def test_tlsAndMutualTls(tmp_path) -> None:
    c = _certs(tmp_path)
    opts = ServerOptions(
        state_dir=str(tmp_path / "s"), port=0, tls_cert=c["server.pem"], tls_key=c["server.key"],
        tls_client_ca=c["ca.pem"],
    )  # fmt: skip
    with BackgroundServer(opts) as s:
        target = f"localhost:{s.port}"
        mutual = grpc.ssl_channel_credentials(c["ca.pem"], c["client.key"], c["client.pem"])
        assert _stub(target, mutual).ListJobs(pb.ListJobsRequest(), timeout=10).jobs == []
        one_way = grpc.ssl_channel_credentials(c["ca.pem"])
        err = _error(lambda: _stub(target, one_way).ListJobs(pb.ListJobsRequest(), timeout=10))
        assert err.code() == grpc.StatusCode.UNAVAILABLE  # no client certificate: handshake refused
        err = _error(lambda: _stub(target).ListJobs(pb.ListJobsRequest(), timeout=5))
        assert err.code() == grpc.StatusCode.UNAVAILABLE  # plaintext refused


def test_healthNotServingOnShutdown_andReflection(tmp_path) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    server = BackgroundServer(ServerOptions(state_dir=str(tmp_path / "s"), port=0))
    channel = grpc.insecure_channel(server.target)
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "secateur.v1.PruningService" in services and "grpc.health.v1.Health" in services
    server.stop()
    import asyncio

    async def status() -> int:
        req = health_pb2.HealthCheckRequest(service="secateur.v1.PruningService")
        return (await server.running.health.Check(req, None)).status

    assert asyncio.run(status()) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_restart_runningJobIsRunAgainToSuccess(digits_data, tmp_path) -> None:
    port, state = free_port(), str(tmp_path / "state")
    cmd = [
        sys.executable, "-m", "secateur.server.main", "--port", str(port), "--host", "127.0.0.1",
        "--metrics-port", "-1", "--state-dir", state,
        "--allowed-uri-prefix", str(digits_data.root),
        "--allowed-uri-prefix", str(tmp_path / "out"),
    ]  # fmt: skip
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        stub = _stub(f"127.0.0.1:{port}")
        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=60)
        # No fine-tuning: the kill comes as soon as the job is RUNNING, and the
        # rerun's point is that it runs again to success, not how long it trains.
        spec = _spec(digits_data, tmp_path / "out")
        job = stub.CreateJob(pb.CreateJobRequest(spec=spec))
        _wait(stub, job.name, states=(Job.STATE_RUNNING,))
        first.send_signal(signal.SIGKILL)  # a crash, not a graceful stop
        first.wait(10)
    finally:
        first.kill()
    stored = SqliteJobStore(state).get(job.name[5:])
    assert stored.state == JobState.RUNNING  # what the crash left behind
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=60)
        final = _wait(stub, job.name)
        assert final.state == Job.STATE_SUCCEEDED and final.attempts == 2
        assert sorted(os.listdir(tmp_path / "out")) == ["1"]  # the killed attempt published nothing
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0  # graceful shutdown


def test_restart_givesUpAfterMaxAttempts(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "secateur.server")
    state = str(tmp_path / "state")
    store = SqliteJobStore(state)
    job = Job(
        name="jobs/stuck",
        state=Job.STATE_RUNNING,
        attempts=3,
        spec=pb.JobSpec(model_uri="m", output_uri="o"),
    )
    job.create_time.GetCurrentTime()
    store.insert(from_pb(job))
    store.close()
    with BackgroundServer(ServerOptions(state_dir=state, port=0)) as s:
        final = _stub(s.target).GetJob(pb.GetJobRequest(name="jobs/stuck"))
    assert final.state == Job.STATE_FAILED and "3 times" in final.error.message
    assert any(
        r.levelno == logging.INFO
        and r.getMessage().startswith("job stuck recovered after a restart: failed")
        for r in caplog.records
    )
    assert final.error.code == grpc.StatusCode.ABORTED.value[0]


def _unsupported_savedmodel(path: str) -> None:
    """A SavedModel without Keras metadata whose serving graph holds an op no layer maps to."""
    code = (
        "import tensorflow as tf, sys\n"
        "class M(tf.Module):\n"
        "    @tf.function(input_signature=[tf.TensorSpec((None, 2))])\n"
        "    def __call__(self, x):\n"
        "        return tf.math.cumsum(x, axis=1)\n"
        "tf.saved_model.save(M(), sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, path], check=True, capture_output=True)
