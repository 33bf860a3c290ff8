"""The processes that read users' model files get no store credentials and no tokens.

A job's process and a PlanPruning process (the real ``secateur.server.workers.job_process``,
started by the real runner) see an environment scrubbed of the job store's URL,
libpq's variables and tokens, while the storage's own settings stay; their
request carries no store URL either: a scaled-out job asks its parent, on its
pipes, whether it may publish.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from secateur.server.workers.spawn import WorkerRunner, job_environment
from secateur.v1 import pruning_pb2 as pb

SECRET = "hunter2-store-password"
#: What a worker pod's environment holds (deploy/k8s) and what else may leak.
HOSTILE_ENV = {
    "SECATEUR_STORE_URL": f"postgresql://secateur:{SECRET}@10.0.0.2:5432/secateur",
    "PGPASSWORD": SECRET,
    "PGHOST": "10.0.0.2",
    "SECATEUR_TOKEN": SECRET,
    "HF_TOKEN": SECRET,
    "SOME_DB": f"postgres://u:{SECRET}@db/x",  # any name: refused by its value
    "AWS_SECRET_ACCESS_KEY": SECRET,
}
#: What jobs need and keep: the storage's settings, TensorFlow's, the path.
KEPT = {
    "GOOGLE_APPLICATION_CREDENTIALS": "/var/run/secrets/gcs/key.json",
    "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}

# Records the environment and the request the real worker is handed, then runs it.
PROBE = """
import json, os, runpy, sys
dump = sys.argv.pop(1)
first = sys.stdin.readline()
class Replay:
    def __init__(self, line, rest):
        self.line, self.rest = line, rest
    def readline(self):
        line, self.line = self.line, None
        return line if line is not None else self.rest.readline()
with open(dump, "w") as fh:
    json.dump({"env": dict(os.environ), "request": first}, fh)
sys.stdin = Replay(first, sys.stdin)
runpy.run_module("secateur.server.workers.job_process", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from secateur.pruner.models import vgg16_bn

    path = tmp_path_factory.mktemp("env") / "tiny.keras"
    vgg16_bn((32, 32, 3), 4, width=0.0625, dense=8, name="tiny").save(str(path))
    return str(path)


def _run(
    tmp_path: Path, mode: str, spec: pb.JobSpec, fence: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The worker's outcome, and what it was handed (environment, request)."""
    dump = tmp_path / f"{mode}.json"
    command = (sys.executable, "-c", PROBE, str(dump))
    allowed = (str(Path(spec.model_uri).parent), str(tmp_path))
    runner = WorkerRunner(command, str(tmp_path / "state"), allowed, grace_s=5.0)
    outcome, _ = asyncio.run(runner.run(mode, f"{mode}-1", spec.SerializeToString(), fence=fence))
    return outcome, json.loads(dump.read_text())


def _assert_scrubbed(handed: dict[str, Any], key: str) -> None:
    env = handed["env"]
    assert not set(HOSTILE_ENV) & set(env), sorted(set(HOSTILE_ENV) & set(env))
    assert SECRET not in json.dumps(handed)  # nowhere: no variable, not in the request
    assert "postgres" not in handed["request"]
    assert {k: env.get(k) for k in KEPT} == KEPT
    assert env["TMPDIR"].endswith(f"/work/{key}")  # the job's own work dir


@pytest.fixture
def hostile_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (HOSTILE_ENV | KEPT).items():
        monkeypatch.setenv(name, value)


def test_planProcess_environmentScrubbed_storageSettingsKept(
    tiny_model, tmp_path, hostile_env
) -> None:
    spec = pb.JobSpec(model_uri=tiny_model, pruning=pb.PruningSpec(ratio=0.5))
    outcome, handed = _run(tmp_path, "plan", spec)
    assert outcome["type"] == "plan", outcome
    _assert_scrubbed(handed, "plan-1")


def test_fencedJobProcess_environmentScrubbed_asksItsParent_publishesNothingWhenRefused(
    tiny_model, tmp_path, hostile_env
) -> None:
    """A scaled-out job: no store URL to reach the store with; the parent says no."""
    asked: list[str] = []

    async def fence(uri: str) -> bool:
        asked.append(uri)
        return False  # this worker lost the job's lease

    out = tmp_path / "out"
    spec = pb.JobSpec(
        model_uri=tiny_model,
        output_uri=str(out),
        pruning=pb.PruningSpec(ratio=0.5),
        training=pb.TrainingSpec(epochs=0, batch_size=8, measure_steps=1),
    )
    outcome, handed = _run(tmp_path, "job", spec, fence)
    assert (outcome["code"], outcome.get("lease_lost")) == ("ABORTED", True), outcome
    assert asked == [str(out / "1")] and not out.exists()  # the version it would publish
    _assert_scrubbed(handed, "job-1")
    assert json.loads(handed["request"])["fenced"] is True


def test_jobEnvironment_dropsCredentialsByNameAndValue_keepsTheRest() -> None:
    env = job_environment(HOSTILE_ENV | KEPT | {"PATH": "/usr/bin"}, "/work/job-1")
    assert env == KEPT | {
        "PATH": "/usr/bin",
        "TMPDIR": "/work/job-1",
        "TF_CPU_ALLOCATOR_USE_BFC": "true",
    }
