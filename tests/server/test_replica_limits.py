"""Bounded resources and secrets of a replica, on real processes (issue 18, items 7 and 9).

- PlanPruning runs at most ``--max-concurrent-plans`` TensorFlow processes: one
  more call gets RESOURCE_EXHAUSTED with ``google.rpc.RetryInfo`` and the replica
  stays SERVING; a plan whose RPC passes its deadline has its process killed.
- Bearer tokens are refused on a non-loopback listener without TLS unless
  ``--allow-plaintext-tokens``; a store password is refused on the command line
  and read from ``--store-url-file`` / $SECATEUR_STORE_URL instead, never shown
  to the processes' command lines or the job processes' environments.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from google.rpc import error_details_pb2, status_pb2

from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .test_serve_hardening import SERVE, SERVING, Served, _refused


def _bogus_model(tmp_path: Path) -> str:
    """A "model" the allow-list admits: its plan process imports TensorFlow, then fails."""
    models = tmp_path / "state" / "models"
    models.mkdir(parents=True)
    (models / "m.keras").write_bytes(b"not a model, but TensorFlow loads first")
    return str(models / "m.keras")


def _children(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def _wait_for(what: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _retry_info(err: grpc.RpcError) -> error_details_pb2.RetryInfo:
    raw = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError(f"no RetryInfo in {status}")


def test_plans_overTheLimit_resourceExhaustedWithRetryInfo_replicaStaysServing(tmp_path) -> None:
    model = _bogus_model(tmp_path)
    s = Served(tmp_path, "--max-concurrent-plans", "1")
    try:
        s.wait_serving()
        stub = pbg.PruningServiceStub(s.channel)
        req = pb.PlanPruningRequest(model_uri=model, pruning=pb.PruningSpec(ratio=0.3))
        first: list[Any] = []

        def plan() -> None:
            try:
                first.append(stub.PlanPruning(req, timeout=120))
            except grpc.RpcError as exc:
                first.append(exc)

        thread = threading.Thread(target=plan)
        thread.start()
        _wait_for(lambda: _children(s.proc))  # the first plan's TensorFlow process runs
        for call in (
            lambda: stub.PlanPruning(req, timeout=30),
            lambda: stub.CreateJob(_validate_only(model, tmp_path), timeout=30),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            assert "--max-concurrent-plans" in err.value.details()
            assert _retry_info(err.value).retry_delay.seconds >= 1
            assert len(_children(s.proc)) == 1  # no second TensorFlow process
            assert s.status() == SERVING
        thread.join(120)
        # The first plan ran to its own answer (the file is no model), not RESOURCE_EXHAUSTED.
        assert isinstance(first[0], grpc.RpcError)
        assert first[0].code() == grpc.StatusCode.INVALID_ARGUMENT, first[0]
    finally:
        s.close()


def _validate_only(model: str, tmp_path: Path) -> pb.CreateJobRequest:
    out = str(tmp_path / "state" / "models" / "out")
    return pb.CreateJobRequest(
        spec=pb.JobSpec(model_uri=model, output_uri=out, pruning=pb.PruningSpec(ratio=0.3)),
        validate_only=True,
    )


@pytest.mark.slow  # ~25 s: TensorFlow imports twice
def test_plan_pastItsDeadline_killsItsProcess_andFreesTheSlot(tmp_path) -> None:
    model = _bogus_model(tmp_path)
    s = Served(tmp_path, "--max-concurrent-plans", "1")
    try:
        s.wait_serving()
        stub = pbg.PruningServiceStub(s.channel)
        req = pb.PlanPruningRequest(model_uri=model, pruning=pb.PruningSpec(ratio=0.3))
        with pytest.raises(grpc.RpcError) as err:
            stub.PlanPruning(req, timeout=1.0)  # TensorFlow takes longer than that to import
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        timed_out = time.monotonic()
        _wait_for(lambda: not _children(s.proc), timeout=15)
        gone_after = time.monotonic() - timed_out
        # The slot is free again: the next plan runs (and fails on the file, not the limit).
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.PlanPruning(req, timeout=120)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        # Killed, not left to finish: it was gone well before a plan ends on its own.
        assert gone_after < min(3.0, time.monotonic() - started - 1.0), gone_after
    finally:
        s.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3"])
def test_tokensWithoutTls_onNonLoopback_refusedUnlessExplicitlyAllowed(tmp_path, host) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    args = ["--host", host, "--port", "0", "--auth-token-file", str(tokens)]
    line = _refused(args, tmp_path)
    assert "without TLS" in line and "--tls-cert" in line and "--allow-plaintext-tokens" in line
    assert "s3cret" not in line


def test_storePasswordOnTheCommandLine_refused(tmp_path) -> None:
    url = "postgresql://app:pw-on-argv@127.0.0.1:1/jobs"
    line = _refused(["--store", url, "--port", "0"], tmp_path)
    assert "--store-url-file" in line and "SECATEUR_STORE_URL" in line
    assert "pw-on-argv" not in line
    done = subprocess.run(
        [SERVE[0], "-c", "import secateur.server.main as m; raise SystemExit(m.worker_main())",
         "--store", url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "pw-on-argv" not in done.stderr, done.stderr


@pytest.mark.parametrize("how", ["file", pytest.param("env", marks=pytest.mark.slow)])
def test_storeUrlFromFileOrEnv_passwordOnNoCommandLineNorJobEnvironment(
    tmp_path, pg_url, how
) -> None:
    # The test PostgreSQL trusts loopback, so any password connects: this one marks the URL.
    secret = "pw-8Zq1"
    url = pg_url.replace("://postgres@", f"://postgres:{secret}@")
    assert secret in url
    env = dict(os.environ)
    extra: list[str] = []
    if how == "file":
        (tmp_path / "store-url").write_text(url + "\n")
        extra = ["--store-url-file", str(tmp_path / "store-url")]
    else:
        env["SECATEUR_STORE_URL"] = url
    model = _bogus_model(tmp_path)
    s = Served(tmp_path, *extra, env=env)
    try:
        s.wait_serving()
        stub = pbg.PruningServiceStub(s.channel)
        stub.ListJobs(pb.ListJobsRequest(), timeout=30)  # the store answers
        req = pb.PlanPruningRequest(model_uri=model, pruning=pb.PruningSpec(ratio=0.3))
        future = stub.PlanPruning.future(req, timeout=120)
        (child,) = _wait_for(lambda: _children(s.proc))
        procs = [psutil.Process(s.proc.pid), child]
        assert all(secret not in " ".join(p.cmdline()) for p in procs)
        assert all(secret not in v for v in child.environ().values())
        assert "SECATEUR_STORE_URL" not in child.environ()
        with pytest.raises(grpc.RpcError):
            future.result()
    finally:
        s.close()
