"""Tenants on a real server (issue 18, item 8): tokens belong to tenants, a tenant
sees, lists, watches and cancels only its own jobs (another's are NOT_FOUND), its
URI prefixes narrow the server's, the token file is read again on SIGHUP, and the
metrics name no tenant. Runs on the embedded SQLite store and on a real PostgreSQL.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .conftest import free_port
from .test_serve_hardening import Served

TOKENS = """\
# two tenants (docs/tenants.md)
tenants:
  team-a:
    tokens: [tok-a]
    allowed_uri_prefixes: [{models}/a]
  team-b:
    tokens: [tok-b]
"""
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def _as(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=30, **kwargs)
    return err.value.code()


@pytest.fixture(params=["sqlite", "postgresql"])
def served(request, tmp_path):
    models = tmp_path / "state" / "models"
    (models / "a").mkdir(parents=True)
    (models / "b").mkdir(parents=True)
    for team in ("a", "b"):
        (models / team / "m.keras").write_bytes(b"queued, never run: the replica runs no jobs")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS.format(models=models))
    store = []
    if request.param == "postgresql":
        store = ["--store", request.getfixturevalue("pg_url")]
    metrics = free_port()
    s = Served(
        tmp_path, "--auth-token-file", str(tokens), "--max-concurrent-jobs", "0",
        "--metrics-port", str(metrics), *store,
    )  # fmt: skip
    s.models, s.tokens, s.metrics = models, tokens, metrics
    try:
        s.wait_serving()
        yield s
    finally:
        s.close()


def _create(stub, models: Path, team: str, token: str, request_id: str = "") -> pb.Job:
    spec = pb.JobSpec(
        model_uri=str(models / team / "m.keras"),
        output_uri=str(models / team / f"out-{time.monotonic_ns()}"),
        pruning=pb.PruningSpec(ratio=0.3),
    )
    req = pb.CreateJobRequest(spec=spec, request_id=request_id)
    return stub.CreateJob(req, metadata=_as(token), timeout=30)


def test_anotherTenantsJob_isNotFound_forGetListWatchCancel(served) -> None:
    stub = pbg.PruningServiceStub(served.channel)
    job = _create(stub, served.models, "a", "tok-a", request_id="rid-1")
    assert job.tenant == "team-a" and job.state == pb.Job.STATE_QUEUED
    # Token B neither reads, lists, watches nor cancels token A's job (issue 18 measured it did).
    b = _as("tok-b")
    assert _code(stub.GetJob, pb.GetJobRequest(name=job.name), metadata=b) == NOT_FOUND
    assert _code(stub.CancelJob, pb.CancelJobRequest(name=job.name), metadata=b) == NOT_FOUND
    watch = stub.WatchJob(pb.WatchJobRequest(name=job.name), metadata=b, timeout=30)
    assert _code(lambda **_: next(watch)) == NOT_FOUND
    assert list(stub.ListJobs(pb.ListJobsRequest(), metadata=b, timeout=30).jobs) == []
    # Nor takes over its request_id: that answers ALREADY_EXISTS, never A's job.
    with pytest.raises(grpc.RpcError) as err:
        _create(stub, served.models, "b", "tok-b", request_id="rid-1")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "team-a" not in str(err.value)
    # B's own job is B's alone; A still sees and cancels its own.
    mine = _create(stub, served.models, "b", "tok-b")
    listed = stub.ListJobs(pb.ListJobsRequest(), metadata=b, timeout=30).jobs
    assert [j.name for j in listed] == [mine.name]
    a = _as("tok-a")
    assert [j.name for j in stub.ListJobs(pb.ListJobsRequest(), metadata=a, timeout=30).jobs] == [
        job.name
    ]
    assert stub.GetJob(pb.GetJobRequest(name=job.name), metadata=a, timeout=30).tenant == "team-a"
    cancelled = stub.CancelJob(pb.CancelJobRequest(name=job.name), metadata=a, timeout=30)
    assert cancelled.state == pb.Job.STATE_CANCELLED
    # The metrics carry no tenant names (nor tokens).
    text = urllib.request.urlopen(f"http://127.0.0.1:{served.metrics}/metrics", timeout=10).read()
    assert b"team-" not in text and b"tok-" not in text


def test_tenantPrefixes_narrowTheServersAllowList(served) -> None:
    stub = pbg.PruningServiceStub(served.channel)
    with pytest.raises(grpc.RpcError) as err:
        _create(stub, served.models, "b", "tok-a")  # team-a may reach models/a only
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
    assert _create(stub, served.models, "b", "tok-b").tenant == "team-b"  # no own prefixes


def test_sighup_readsTheTokenFileAgain(served) -> None:
    stub = pbg.PruningServiceStub(served.channel)
    job = _create(stub, served.models, "a", "tok-a")
    served.tokens.write_text(
        TOKENS.format(models=served.models).replace("[tok-a]", "[tok-a, tok-a2]")
        .replace("[tok-b]", "[tok-b2]")
    )  # fmt: skip
    served.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while True:
        try:
            got = stub.GetJob(pb.GetJobRequest(name=job.name), metadata=_as("tok-a2"), timeout=5)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline
            time.sleep(0.1)
    assert got.name == job.name
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert _code(stub.ListJobs, pb.ListJobsRequest(), metadata=_as("tok-b")) == unauth
    # A file that no longer parses keeps the tokens in force.
    served.tokens.write_text("tenants: [not, a, mapping]\n")
    served.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert stub.GetJob(pb.GetJobRequest(name=job.name), metadata=_as("tok-a"), timeout=5)
    assert served.proc.poll() is None


def test_postgresFromBeforeTenants_migrates_oldJobsStayTheUnnamedTenants(
    pg_url, monkeypatch
) -> None:
    """Migration 3 on a database at version 2 with a job in it (as an upgrade finds it)."""
    import psycopg

    from secateur.server.jobstore import schema
    from secateur.server.jobstore.jobs_pb import to_pb
    from secateur.server.jobstore.postgres import PostgresJobStore
    from secateur.server.jobstore.records import JobRecord, JobState, now_ns

    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert schema.migrate(conn) == [1, 2]
        old = JobRecord(id="old", spec=b"", state=JobState.QUEUED, create_ns=now_ns())
        conn.execute(
            "INSERT INTO jobs (id, state, create_ns, create_time, data) "
            "VALUES (%s, 1, %s, now(), %s)",
            (old.id, old.create_ns, to_pb(old).SerializeToString()),
        )
    monkeypatch.undo()
    store = PostgresJobStore(pg_url, pool_size=2)
    try:
        assert [r.id for r in store.page(None, None, 10, tenant="")[0]] == ["old"]
        assert store.page(None, None, 10, tenant="team-a")[0] == []
        assert store.get("old").tenant == ""
    finally:
        store.close()
