"""``secateur serve`` with a shared store: ListJobs pages continued on another
replica, the in-process worker's lease (--lease-seconds), refused values, and the
loud warning of a SQLite server that runs nothing (--max-concurrent-jobs 0)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.server.jobstore.postgres import PostgresJobStore
from secateur.server.jobstore.records import JobRecord, JobState, now_ns
from secateur.server.main import main
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg


def test_listJobs_pageTokenOfOneReplica_continuedOnTheOther(pg_url: str, tmp_path: Path) -> None:
    store = PostgresJobStore(pg_url)
    base = now_ns()
    spec = pb.JobSpec(model_uri="/m.keras", output_uri="/out").SerializeToString()
    for i in range(3):
        store.insert(JobRecord(id=f"j{i}", spec=spec, state=JobState.QUEUED, create_ns=base + i))
    store.close()
    options = [
        ServerOptions(str(tmp_path / name), port=0, store_url=pg_url, max_concurrent_jobs=0)
        for name in ("a", "b")  # state dirs of their own, as pods have
    ]
    with BackgroundServer(options[0]) as a, BackgroundServer(options[1]) as b:
        stubs = [pbg.PruningServiceStub(grpc.insecure_channel(s.target)) for s in (a, b)]
        first = stubs[0].ListJobs(pb.ListJobsRequest(page_size=2))
        assert [j.name for j in first.jobs] == ["jobs/j2", "jobs/j1"] and first.next_page_token
        rest = stubs[1].ListJobs(pb.ListJobsRequest(page_size=2, page_token=first.next_page_token))
        assert [j.name for j in rest.jobs] == ["jobs/j0"] and rest.next_page_token == ""
        forged = first.next_page_token[:-2] + ("AA" if first.next_page_token[-2:] != "AA" else "BB")
        with pytest.raises(grpc.RpcError) as err:
            stubs[1].ListJobs(pb.ListJobsRequest(page_size=2, page_token=forged))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--lease-seconds", "0.5"], "--lease-seconds must be >= 1. Received: 0.5"),
        (["--lease-seconds", "nan"], "--lease-seconds must be >= 1. Received: nan"),
        (["--max-concurrent-jobs", "-1"], "--max-concurrent-jobs must be >= 0. Received: -1"),
    ],
)
def test_serve_badFlag_exits2NamingIt(
    flags: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    assert main(["--port", "0", "--state-dir", str(state), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"secateur serve: {said}"
    assert not state.exists()


def test_serve_leaseSeconds_reachesTheInProcessWorker(pg_url: str, tmp_path: Path) -> None:
    options = ServerOptions(
        state_dir=str(tmp_path), port=0, store_url=pg_url, max_concurrent_jobs=1, lease_s=7.0
    )
    with BackgroundServer(options) as server:
        manager = server.running.manager
        assert manager is not None and manager.worker_loop is not None
        assert manager.worker_loop.cfg.lease_s == 7.0


def test_serve_sqliteRunningNothing_warnsLoudly(tmp_path: Path) -> None:
    out, err = tmp_path / "out", tmp_path / "err"
    argv = [sys.executable, "-m", "secateur.server.main", "--port", "0", "--metrics-port", "-1"]
    argv += ["--state-dir", str(tmp_path / "state"), "--max-concurrent-jobs", "0"]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(argv, stdout=o, stderr=e)
    try:
        deadline = time.monotonic() + 60
        while "secateur serving on" not in out.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()
            time.sleep(0.1)
        warning = [line for line in err.read_text().splitlines() if "WARNING" in line]
        assert len(warning) == 1 and "NOTHING runs them" in warning[0], warning
        assert "postgresql://" in warning[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
