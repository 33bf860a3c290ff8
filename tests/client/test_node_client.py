"""The Node.js client (client/node) against the real server on loopback.

The script loads proto/secateur/v1/pruning.proto at run time with
@grpc/proto-loader, so these tests also check that the contract loads from
proto/ alone (google/rpc/status.proto included) outside Python. The server
runs no jobs (max_concurrent_jobs=0): a created job stays QUEUED.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.v1 import pruning_pb2, pruning_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "client" / "node"
SCRIPT = NODE_DIR / "create_and_get.js"
NPM_CI_TIMEOUT_S = 180
NODE_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def node_client() -> Path:
    """client/node with its dependencies installed (``npm ci`` when missing)."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"the Node.js client tests need `{tool}` on PATH; it is not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        try:
            proc = subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=NPM_CI_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"`npm ci` in {NODE_DIR} took over {NPM_CI_TIMEOUT_S} s")
        assert proc.returncode == 0, f"`npm ci` failed:\n{proc.stdout}\n{proc.stderr}"
    return NODE_DIR


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    """A dummy model (never loaded: no job runs) and an output folder, both allowed."""
    models = tmp_path / "models"
    models.mkdir()
    model = models / "m.keras"
    model.write_bytes(b"not a real model; max_concurrent_jobs=0 never loads it")
    return {"root": str(tmp_path), "model": str(model), "out": str(tmp_path / "out")}


@pytest.fixture
def server(paths: dict[str, str], tmp_path: Path) -> Iterator[BackgroundServer]:
    opts = ServerOptions(
        state_dir=str(tmp_path / "state"),
        port=0,
        allowed_prefixes=(paths["root"],),
        max_concurrent_jobs=0,
    )
    with BackgroundServer(opts) as s:
        yield s


def _run_node(node_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(SCRIPT), *args],
        cwd=node_dir,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        env={**os.environ, "NO_COLOR": "1"},
    )


def test_nodeCreateAndGet_jobRoundTripsAndPythonSeesIt(
    node_client: Path, server: BackgroundServer, paths: dict[str, str]
) -> None:
    proc = _run_node(node_client, server.target, paths["model"], paths["out"], "0.3")

    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    out: dict[str, Any] = json.loads(lines[0])
    created, fetched = out["created"], out["fetched"]
    assert created["name"] == fetched["name"]
    assert created["name"].startswith("jobs/") and len(created["name"]) > len("jobs/")
    for job in (created, fetched):
        assert job["state"] == "STATE_QUEUED"
        assert job["spec"]["model_uri"] == paths["model"]
        assert job["spec"]["output_uri"] == paths["out"]
        assert job["spec"]["pruning"]["ratio"] == pytest.approx(0.3)
        assert job["spec"]["pruning"]["criterion"] == "CRITERION_UNSPECIFIED"
        assert job["request_id"]
        assert job["error"] is None
    assert created["request_id"] == fetched["request_id"]
    assert created["create_time"] == fetched["create_time"]
    assert isinstance(created["create_time"]["seconds"], str)  # longs: String

    with grpc.insecure_channel(server.target) as channel:
        stub = pruning_pb2_grpc.PruningServiceStub(channel)
        job = stub.GetJob(pruning_pb2.GetJobRequest(name=created["name"]), timeout=10)
    assert job.name == created["name"]
    assert job.state == pruning_pb2.Job.STATE_QUEUED
    assert job.request_id == created["request_id"]
    assert job.spec.model_uri == paths["model"]
    assert job.spec.output_uri == paths["out"]
    assert job.spec.pruning.ratio == pytest.approx(0.3)
    assert str(job.create_time.seconds) == created["create_time"]["seconds"]


def test_nodeCreateAndGet_invalidRatio_exits1WithInvalidArgument(
    node_client: Path, server: BackgroundServer, paths: dict[str, str]
) -> None:
    proc = _run_node(node_client, server.target, paths["model"], paths["out"], "1.5")

    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "INVALID_ARGUMENT" in proc.stderr
    assert "ratio" in proc.stderr
    with grpc.insecure_channel(server.target) as channel:
        stub = pruning_pb2_grpc.PruningServiceStub(channel)
        jobs = stub.ListJobs(pruning_pb2.ListJobsRequest(), timeout=10)
    assert list(jobs.jobs) == []  # nothing was created
