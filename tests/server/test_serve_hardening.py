"""``secateur serve`` as a process: who it listens to (issue 8, class 2), malformed
request bytes (11), start-up problems and corrupt rows (13), and draining on SIGTERM (15).

Servers run on loopback; the start-up and shutdown checks run the real entry point
(``python -m secateur.server.main``) as a subprocess.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.server.jobstore.interface import StoreOpenError
from secateur.server.jobstore.jobs_pb import from_pb
from secateur.server.jobstore.records import JobState
from secateur.server.jobstore.sqlite import SqliteJobStore
from secateur.server.main import add_serve_arguments, exposure_problem
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .conftest import free_port

Job = pb.Job
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVE = [sys.executable, "-m", "secateur.server.main", "--metrics-port", "-1"]


def _refused(args: list[str], cwd: Path, only_line: bool = True) -> str:
    """Run ``secateur serve ARGS``; assert it exits 2 with one line and no traceback.

    ``only_line=False``: gRPC's C core may log its own line first (a failed bind).
    """
    done = subprocess.run(
        [*SERVE, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "Error:" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("secateur serve: ") and (len(lines) == 1 or not only_line), lines
    return lines[-1]


class Served:
    """``secateur serve`` in a subprocess on 127.0.0.1, output in a file."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = tmp_path / f"serve-{self.port}.log"
        argv = [*SERVE, "--port", str(self.port), "--state-dir", str(tmp_path / "state"), *args]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self) -> int:
        req = health_pb2.HealthCheckRequest(service="secateur.v1.PruningService")
        return self.health.Check(req, timeout=5).status

    def wait_serving(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.status() == SERVING:
                    return
            except grpc.RpcError:
                assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"not SERVING after 60 s:\n{self.log.read_text()}")

    def wait_not_serving(self) -> float:
        """Poll until NOT_SERVING (never UNAVAILABLE first); when it was seen."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.status() == NOT_SERVING:  # an RpcError here fails the test
                return time.monotonic()
            time.sleep(0.05)
        raise AssertionError("never NOT_SERVING")

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# -- class 2: no unauthenticated server on a reachable address ------------------


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        ([], False),  # the default host is 127.0.0.1
        (["--host", "localhost"], False),
        (["--host", "::1"], False),
        (["--host", "[::1]"], False),
        (["--host", "0.0.0.0"], True),
        (["--host", "::"], True),
        (["--host", "10.1.2.3"], True),
        (["--host", "server.example"], True),
        (["--host", "0.0.0.0", "--auth-token-file", "t"], False),
        (
            ["--host", "0.0.0.0", "--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca"],
            False,
        ),
        (["--host", "0.0.0.0", "--tls-cert", "c", "--tls-key", "k"], True),  # TLS, anyone
        (["--host", "0.0.0.0", "--allow-unauthenticated"], False),
    ],
)
def test_exposure_nonLoopbackNeedsTokensMtlsOrExplicitOptOut(flags, refused) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    problem = exposure_problem(parser.parse_args(flags))
    assert (problem is not None) == refused
    if problem:
        assert "--auth-token-file" in problem and "--allow-unauthenticated" in problem


def test_serve_allInterfacesWithoutAuth_exits2BeforeTouchingState(tmp_path) -> None:
    state = tmp_path / "state"
    line = _refused(["--host", "0.0.0.0", "--port", "0", "--state-dir", str(state)], tmp_path)
    assert "--auth-token-file" in line and "--allow-unauthenticated" in line and "0.0.0.0" in line
    assert not state.exists()


def test_serve_allInterfacesWithTokenFile_serves_andStopsOnSigint(tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# ci\ns3cret\n")
    s = Served(
        tmp_path,
        "--host",
        "0.0.0.0",
        "--auth-token-file",
        str(tokens),
        "--allow-plaintext-tokens",
        "--shutdown-grace-seconds",
        "0",
    )
    try:
        s.wait_serving()
        stub = pbg.PruningServiceStub(s.channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListJobs(pb.ListJobsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.ListJobs(pb.ListJobsRequest(), metadata=[("authorization", "Bearer s3cret")])
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(30) == 0
    finally:
        s.close()


# -- class 11: malformed request bytes ----------------------------------------


@pytest.fixture(scope="module")
def background(tmp_path_factory) -> Iterator[BackgroundServer]:
    state = tmp_path_factory.mktemp("state")
    with BackgroundServer(ServerOptions(state_dir=str(state), port=0, metrics_port=0)) as s:
        yield s


GARBAGE = [
    b"\xff\xff\xff\xff",  # field 0 / invalid wire type
    b"\x0a\x05ab",  # a string field longer than the message
    b"\x08\xff",  # a truncated varint
]
NOT_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (name, service) is a string that is not UTF-8
UNARY = [
    ("/secateur.v1.PruningService/CreateJob", "secateur.v1.CreateJobRequest"),
    ("/secateur.v1.PruningService/GetJob", "secateur.v1.GetJobRequest"),
    ("/secateur.v1.PruningService/ListJobs", "secateur.v1.ListJobsRequest"),
    ("/secateur.v1.PruningService/CancelJob", "secateur.v1.CancelJobRequest"),
    ("/secateur.v1.PruningService/PlanPruning", "secateur.v1.PlanPruningRequest"),
    ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
]


def _assert_invalid(err: grpc.RpcError, message_type: str, size: int) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details() == (
        f"the request is not a valid {message_type} message (protobuf decoding failed). "
        f"Received: {size} bytes"
    )


@pytest.mark.parametrize("raw", GARBAGE)
@pytest.mark.parametrize(("method", "message_type"), UNARY)
def test_malformedRequestBytes_unary_invalidArgumentWithoutPythonText(
    background, method, message_type, raw
) -> None:
    with grpc.insecure_channel(background.target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(raw, timeout=10)
    _assert_invalid(info.value, message_type, len(raw))


@pytest.mark.parametrize(
    ("method", "message_type"), [UNARY[1], UNARY[3], UNARY[5]], ids=["get", "cancel", "health"]
)
def test_stringFieldNotUtf8_unary_invalidArgument(background, method, message_type) -> None:
    with grpc.insecure_channel(background.target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(NOT_UTF8, timeout=10)
    _assert_invalid(info.value, message_type, len(NOT_UTF8))


@pytest.mark.parametrize("raw", [*GARBAGE, NOT_UTF8])
def test_malformedRequestBytes_watchStream_invalidArgument(background, raw) -> None:
    with grpc.insecure_channel(background.target) as channel:
        call = channel.unary_stream(
            "/secateur.v1.PruningService/WatchJob",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call(raw, timeout=10))
    _assert_invalid(info.value, "secateur.v1.WatchJobRequest", len(raw))
    # The server goes on answering well-formed calls.
    stub = pbg.PruningServiceStub(grpc.insecure_channel(background.target))
    assert stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs is not None


# -- class 13: start-up problems and undecodable rows --------------------------


def _corrupt_db(state: Path) -> Path:
    state.mkdir()
    db = state / "jobs.sqlite"
    db.write_bytes(b"this is not a SQLite database\n" * 200)
    return db


def test_serve_stateDirIsAFile_exits2NamingIt(tmp_path) -> None:
    state = tmp_path / "state"
    state.write_text("not a folder")
    line = _refused(["--state-dir", str(state)], tmp_path)
    assert f"cannot create the state directory {state}" in line and "--state-dir" in line


def test_serve_stateDirUnderAFile_exits2NamingIt(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    state = tmp_path / "file" / "state"
    line = _refused(["--state-dir", str(state)], tmp_path)
    assert f"cannot create the state directory {state}" in line


def test_serve_corruptDatabase_exits2SayingWhatToDo(tmp_path) -> None:
    db = _corrupt_db(tmp_path / "state")
    before = db.read_bytes()
    line = _refused(["--state-dir", str(tmp_path / "state")], tmp_path)
    assert f"cannot open the job database {db}" in line and "move it" in line
    assert db.read_bytes() == before  # left as found, for recovery


def test_serve_databaseIsADirectory_exits2(tmp_path) -> None:
    (tmp_path / "state" / "jobs.sqlite").mkdir(parents=True)
    line = _refused(["--state-dir", str(tmp_path / "state")], tmp_path)
    assert f"cannot open the job database {tmp_path / 'state' / 'jobs.sqlite'}" in line


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root ignores file permissions: a chmod'ed database stays writable"
)
def test_serve_readOnlyDatabase_exits2(tmp_path) -> None:
    state = tmp_path / "state"
    SqliteJobStore(str(state)).close()
    for p in state.iterdir():
        p.chmod(0o444)
    state.chmod(0o555)
    try:
        line = _refused(["--state-dir", str(state)], tmp_path)
    finally:
        state.chmod(0o755)
    assert f"cannot open the job database {state / 'jobs.sqlite'}" in line and "read-only" in line


def test_serve_missingTokenFileAndPortInUse_exit2(tmp_path) -> None:
    line = _refused(["--auth-token-file", str(tmp_path / "nope")], tmp_path)
    assert f"cannot read --auth-token-file {tmp_path / 'nope'}" in line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _refused(
            ["--port", str(port), "--state-dir", str(tmp_path / "s")], tmp_path, only_line=False
        )
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line


def test_store_openProblems_areTyped(tmp_path) -> None:
    _corrupt_db(tmp_path / "state")
    with pytest.raises(StoreOpenError, match="is corrupt"):
        SqliteJobStore(str(tmp_path / "state"))


def _job(job_id: str, state: int) -> Job:
    job = Job(name=f"jobs/{job_id}", state=state, spec=pb.JobSpec(model_uri="m", output_uri="o"))
    job.create_time.GetCurrentTime()
    return job


def test_undecodableRow_isQuarantinedFailed_othersServed(tmp_path) -> None:
    state = str(tmp_path / "state")
    store = SqliteJobStore(state)
    store.insert(from_pb(_job("good1", Job.STATE_SUCCEEDED)))
    store.insert(from_pb(_job("bad", Job.STATE_RUNNING)))
    store.insert(from_pb(_job("stray", Job.STATE_QUEUED)))
    store.insert(from_pb(_job("good2", Job.STATE_CANCELLED)))
    store.close()
    with sqlite3.connect(os.path.join(state, "jobs.sqlite")) as db:
        db.execute("UPDATE jobs SET data = ? WHERE id = 'bad'", (b"\xff\x00garbage",))
        # Decodes, but as another job: as wrong as garbage.
        db.execute(
            "UPDATE jobs SET data = ? WHERE id = 'stray'", (_job("x", 1).SerializeToString(),)
        )
    db.close()
    with BackgroundServer(ServerOptions(state_dir=state, port=0)) as s:
        stub = pbg.PruningServiceStub(grpc.insecure_channel(s.target))
        for job_id in ("bad", "stray"):
            job = stub.GetJob(pb.GetJobRequest(name=f"jobs/{job_id}"), timeout=10)
            assert job.state == Job.STATE_FAILED and job.error.code == code_pb2.DATA_LOSS
            assert "could not read this job's stored record" in job.error.message
        assert stub.GetJob(pb.GetJobRequest(name="jobs/good1")).state == Job.STATE_SUCCEEDED
        assert stub.GetJob(pb.GetJobRequest(name="jobs/good2")).state == Job.STATE_CANCELLED
        listed = stub.ListJobs(pb.ListJobsRequest(page_size=10)).jobs
        assert {j.name for j in listed} == {f"jobs/{i}" for i in ("good1", "bad", "stray", "good2")}
    # FAILED is stored; the original bytes are kept aside.
    reopened = SqliteJobStore(state)
    assert reopened.get("bad").state == JobState.FAILED
    reopened.close()
    with sqlite3.connect(os.path.join(state, "jobs.sqlite")) as db:
        kept = dict(db.execute("SELECT id, data FROM quarantine").fetchall())
    db.close()
    assert kept["bad"] == b"\xff\x00garbage" and set(kept) == {"bad", "stray"}


# -- class 15: drain on SIGTERM -----------------------------------------------


def test_sigterm_notServingDuringGrace_callsStillAnswered_thenExit0(tmp_path) -> None:
    s = Served(tmp_path, "--shutdown-grace-seconds", "3")
    try:
        s.wait_serving()
        stub = pbg.PruningServiceStub(s.channel)
        sent = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        seen = s.wait_not_serving()
        assert s.proc.poll() is None
        assert stub.ListJobs(pb.ListJobsRequest(), timeout=5).jobs is not None  # still answered
        assert s.status() == NOT_SERVING
        assert s.proc.wait(30) == 0
        assert time.monotonic() - sent >= 2.5 and seen - sent < 2.5
    finally:
        s.close()


def test_sigterm_secondSignalEndsTheGraceEarly(tmp_path) -> None:
    s = Served(tmp_path, "--shutdown-grace-seconds", "120")
    try:
        s.wait_serving()
        s.proc.send_signal(signal.SIGTERM)
        s.wait_not_serving()
        sent = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
        assert time.monotonic() - sent < 20
    finally:
        s.close()
