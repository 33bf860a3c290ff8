"""A hostile client against a real server on loopback: the bad-input matrix.

Each row of the matrix (tests/server/adversarial_cases.py plus the few rows
below that need a worker or a real job) sends one request to one server
shared by the module and checks the service's contract for bad input:

- the status code (never UNKNOWN, never INTERNAL without an incident id,
  never RESOURCE_EXHAUSTED from an echoed value);
- a google.rpc.Status trailer that decodes, with a BadRequest violation
  naming the field to blame;
- a short message (< 2 KiB) with no Python traceback, class name, control
  character or server-internal work path;
- nothing written on disk and no job created where the request is refused;
- the server still answers a health check and GetJob afterwards.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from secateur.server.api.service import SERVICE_NAME, BackgroundServer, ServerOptions
from secateur.server.jobstore.jobs_pb import from_pb
from secateur.server.jobstore.sqlite import SqliteJobStore
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .adversarial_cases import IA, Case, cases

Job = pb.Job
OK = grpc.StatusCode.OK
MAX_MESSAGE = 2048
MAX_DETAILS = 4096
SEEDED = {
    "seed-done": Job.STATE_SUCCEEDED,
    "seed-failed": Job.STATE_FAILED,
    "seed-cancelled": Job.STATE_CANCELLED,
}
PYTHON_TEXT = re.compile(
    r"Traceback|File \"|<class |\b[A-Z]\w*(Error|Exception)\b|\.py\b|site-packages"
    r"|\bsecateur\.(server|pruner|client)\b"  # modules; proto names (secateur.v1.X) are the API
)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
REQUESTS = {
    "CreateJob": pb.CreateJobRequest,
    "GetJob": pb.GetJobRequest,
    "ListJobs": pb.ListJobsRequest,
    "CancelJob": pb.CancelJobRequest,
    "WatchJob": pb.WatchJobRequest,
    "PlanPruning": pb.PlanPruningRequest,
}


@dataclass
class Env:
    root: str
    allowed: str
    outside: str
    state: str
    model: str
    marker: str
    server: BackgroundServer
    channel: grpc.Channel
    stub: pbg.PruningServiceStub

    def real_token(self) -> str:
        token: str = self.stub.ListJobs(pb.ListJobsRequest(page_size=1)).next_page_token
        assert token, "three seeded jobs and page_size=1 must give a next_page_token"
        return token

    def job_names(self) -> set[str]:
        return {j.name for j in self.stub.ListJobs(pb.ListJobsRequest(page_size=1000)).jobs}

    def files(self) -> set[str]:
        """Every path under the allowed and outside trees and the state's work dir."""
        out = set()
        for top in (self.allowed, self.outside, os.path.join(self.state, "work")):
            for dirpath, dirs, names in os.walk(top):
                out.update(os.path.join(dirpath, n) for n in dirs + names)
        return out


def _tiny_models(models: Path, marker: str) -> str:
    """A real Conv-BN model, and one whose Lambda layer writes ``marker`` when run."""
    import keras

    inp = keras.Input((8, 8, 3))
    x = inp
    for width in (8, 16):
        x = keras.layers.Conv2D(width, 3, padding="same")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inp, keras.layers.Dense(10)(x), name="tiny").save(models / "tiny.keras")
    evil = eval(f"lambda x: (open({marker!r}, 'w').write('pwned'), x)[1]")
    inp = keras.Input((8, 8, 3))
    out = keras.layers.Dense(10)(keras.layers.Flatten()(keras.layers.Lambda(evil)(inp)))
    keras.Model(inp, out, name="evil").save(models / "lambda.keras")
    os.remove(marker)  # building the model ran the lambda once, here in the test
    return str(models / "tiny.keras")


def _data(data: Path, outside: Path) -> None:
    from secateur.pruner.data import write_examples

    rng = np.random.default_rng(0)
    images, labels = rng.uniform(0, 255, (100, 8, 8, 3)), rng.integers(0, 10, 100)
    write_examples(str(data / "eval.tfrecord"), images[:40], labels[:40])
    write_examples(str(outside / "eval.tfrecord"), images[:40], labels[:40])
    write_examples(str(outside / "data-0.tfrecord"), images[:40], labels[:40])
    corrupt = data / "train-corrupt.tfrecord"
    write_examples(str(corrupt), images, labels)
    # 60 whole records and 9 bytes of the 61st (a cut exactly between records is a valid file)
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size * 6 // 10 + 9])


def _files(root: Path) -> tuple[Path, Path, str, str]:
    allowed, outside = root / "allowed", root / "outside"
    models, data = allowed / "models", allowed / "data"
    for d in (models / "nosm" / "variables", models / "sm", data, outside, allowed / "taken/1"):
        d.mkdir(parents=True)
    marker = str(root / "pwned")
    model = _tiny_models(models, marker)
    _data(data, outside)
    (models / "junk.keras").write_bytes(random.Random(0).randbytes(4096))
    (models / "empty.h5").write_bytes(b"")
    (models / "sm" / "saved_model.pb").write_bytes(b"\x08\x01garbage")
    (outside / "model.keras").write_bytes((models / "junk.keras").read_bytes())
    (allowed / "taken/1/saved_model.pb").write_bytes(b"x")
    (allowed / "escape").symlink_to(outside, target_is_directory=True)
    (outside / "out-target").mkdir()
    (allowed / "outlink").symlink_to(outside / "out-target", target_is_directory=True)
    return allowed, outside, model, marker


def _seed(state: str) -> None:
    store = SqliteJobStore(state)
    for i, (jid, st) in enumerate(SEEDED.items()):
        job = Job(name=f"jobs/{jid}", state=st, spec=pb.JobSpec(model_uri="m", output_uri="o"))
        job.create_time.FromSeconds(1_700_000_000 + i)
        store.insert(from_pb(job))
    store.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("adversarial")
    allowed, outside, model, marker = _files(root)
    state = str(root / "state")
    _seed(state)
    opts = ServerOptions(
        state_dir=state, port=0, allowed_prefixes=(str(allowed),), max_concurrent_jobs=2
    )
    with BackgroundServer(opts) as server:
        channel = grpc.insecure_channel(server.target)
        stub = pbg.PruningServiceStub(channel)
        yield Env(
            str(root), str(allowed), str(outside), state, model, marker, server, channel, stub
        )
        channel.close()


def _good(e: Env, rpc: str) -> Any:
    if rpc == "CreateJob":
        spec = pb.JobSpec(
            model_uri=e.model,
            output_uri=os.path.join(e.allowed, "out"),
            pruning=pb.PruningSpec(ratio=0.3),
            training=pb.TrainingSpec(
                batch_size=16,
                measure_steps=1,
                eval_data=os.path.join(e.allowed, "data", "eval.tfrecord"),
            ),
        )
        return pb.CreateJobRequest(spec=spec)
    if rpc == "PlanPruning":
        return pb.PlanPruningRequest(model_uri=e.model, pruning=pb.PruningSpec(ratio=0.3))
    if rpc == "ListJobs":
        return pb.ListJobsRequest()
    return REQUESTS[rpc](name="jobs/seed-done")


def _request(e: Env, case: Case) -> Any:
    if isinstance(case.request, bytes):
        return case.request
    msg = _good(e, case.rpc)
    for path, value in case.request.items():
        *parents, leaf = path.split(".")
        target = msg
        for p in parents:
            target = getattr(target, p)
        value = value(e) if callable(value) else value
        if value is None:
            target.ClearField(leaf)
        elif isinstance(value, list):
            del getattr(target, leaf)[:]
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)
    return msg


def _call(e: Env, case: Case, request: Any) -> tuple[Any, grpc.RpcError | None]:
    timeout = 180 if case.worker else 30
    rpc = case.rpc.removeprefix("raw:")
    try:
        if case.rpc.startswith("raw:"):
            method = f"/{SERVICE_NAME}/{rpc}"
            if rpc == "WatchJob":
                return list(e.channel.unary_stream(method)(request, timeout=timeout)), None
            return e.channel.unary_unary(method)(request, timeout=timeout), None
        if rpc == "WatchJob":
            return list(e.stub.WatchJob(request, timeout=timeout)), None
        return getattr(e.stub, rpc)(request, timeout=timeout), None
    except grpc.RpcError as err:
        return None, err


def _status_problems(e: Env, case: Case, err: grpc.RpcError) -> list[str]:
    problems = []
    msg = err.details() or ""
    if len(msg.encode()) >= MAX_MESSAGE:
        problems.append(f"message is {len(msg.encode())} bytes (limit {MAX_MESSAGE})")
    if m := PYTHON_TEXT.search(msg):
        problems.append(f"message shows Python text {m.group(0)!r}")
    if CONTROL.search(msg):
        problems.append("message carries raw control characters")
    if msg.count("Received:") > 1:
        problems.append(f"message says 'Received:' more than once: {msg[:300]!r}")
    for internal in (e.state, "secateur-job-", "/work/plan-", "/work/"):
        if internal in msg:
            problems.append(f"message names a server-internal path ({internal!r})")
    if err.code() == grpc.StatusCode.INTERNAL and "incident" not in msg:
        problems.append("INTERNAL without an incident id")
    try:
        status = rpc_status.from_call(err)
    except ValueError as exc:
        return [*problems, f"status trailer does not match the call: {exc}"]
    if status is None:
        if not case.rpc.startswith("raw:"):
            problems.append("no google.rpc.Status trailer")
        return problems
    if len(status.SerializeToString()) >= MAX_DETAILS:
        problems.append(f"status details are {len(status.SerializeToString())} bytes")
    fields = []
    for detail in status.details:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            fields += [v.field for v in br.field_violations]
    want = case.field
    if want and not any(f == want or f.startswith((want + "[", want + ".")) for f in fields):
        problems.append(f"BadRequest fields {fields} lack {want!r}")
    return problems


def _after(e: Env, case: Case, before: tuple[set[str], set[str]]) -> list[str]:
    problems = []
    health = health_pb2_grpc.HealthStub(e.channel)
    serving = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    if serving.status != health_pb2.HealthCheckResponse.SERVING:
        problems.append(f"health is {serving.status} after the case")
    if (
        e.stub.GetJob(pb.GetJobRequest(name="jobs/seed-done"), timeout=10).state
        != Job.STATE_SUCCEEDED
    ):
        problems.append("a seeded job changed")
    if os.path.exists(e.marker):
        problems.append("code from a model file ran (marker written)")
        os.remove(e.marker)
    if case.creates:
        return problems
    new_jobs = e.job_names() - before[0]
    for name in new_jobs:  # keep a wrongly accepted job from running on
        e.stub.CancelJob(pb.CancelJobRequest(name=name), timeout=10)
    if new_jobs:
        problems.append(f"job(s) created: {sorted(new_jobs)}")
    created = e.files() - before[1]
    if created:
        problems.append(f"written on disk: {sorted(created)[:5]}")
    return problems


def run_case(e: Env, case: Case) -> list[str]:
    """Send one row's request; every way the answer breaks the contract."""
    request = _request(e, case)
    before = (e.job_names(), e.files())
    result, err = _call(e, case, request)
    code = err.code() if err is not None else OK
    problems = [] if code in case.codes else [f"code {code.name}, expected {case.codes[0].name}"]
    if err is not None:
        problems += _status_problems(e, case, err)
        if case.names_uri:
            uri = getattr(request, case.names_uri)
            if os.path.basename(uri) not in (err.details() or ""):
                problems.append(f"message does not name the client's {case.names_uri}")
    if case.then is not None and err is None:
        problems += case.then(e, result)
    problems += _after(e, case, before)
    if problems and err is not None:
        problems.append(f"got {code.name}: {(err.details() or '')[:300]!r}")
    return problems


def _wait(e: Env, name: str, timeout: float = 150) -> Job:
    deadline = time.monotonic() + timeout
    job = e.stub.GetJob(pb.GetJobRequest(name=name))
    while job.state not in (Job.STATE_SUCCEEDED, Job.STATE_FAILED, Job.STATE_CANCELLED):
        if time.monotonic() > deadline:
            e.stub.CancelJob(pb.CancelJobRequest(name=name))
            raise AssertionError(f"{name} still {Job.State.Name(job.state)} after {timeout}s")
        time.sleep(0.25)
        job = e.stub.GetJob(pb.GetJobRequest(name=name))
    return job


def _validated_nothing(e: Env, job: Job) -> list[str]:
    return [] if not job.name and job.state == Job.STATE_UNSPECIFIED else [f"got a job {job.name}"]


def _same_job_again(e: Env, job: Job) -> list[str]:
    req = _good(e, "CreateJob")
    req.request_id = "adversarial-dup-1"
    again = e.stub.CreateJob(req, timeout=30)
    e.stub.CancelJob(pb.CancelJobRequest(name=job.name), timeout=10)
    final = _wait(e, job.name)
    problems = [] if again.name == job.name else [f"a retry made {again.name}, not {job.name}"]
    same = [j for j in e.stub.ListJobs(pb.ListJobsRequest()).jobs if j.request_id == req.request_id]
    if len(same) != 1:
        problems.append(f"{len(same)} jobs carry the request_id")
    if final.state != Job.STATE_CANCELLED or os.path.exists(os.path.join(e.allowed, "out")):
        problems.append(f"cancelled job ended {Job.State.Name(final.state)} or published")
    return problems


def _fails_naming_data(e: Env, job: Job) -> list[str]:
    final = _wait(e, job.name)
    msg = final.error.message
    problems = []
    if final.state != Job.STATE_FAILED or final.error.code != IA.value[0]:
        problems.append(f"job ended {Job.State.Name(final.state)} code {final.error.code}: {msg!r}")
    if "train-corrupt.tfrecord" not in msg or e.state in msg or "secateur-job-" in msg:
        problems.append(f"job error does not name the client's file only: {msg[:300]!r}")
    if os.path.exists(os.path.join(e.allowed, "out-data")):
        problems.append("a job on corrupt data published a model")
    return problems


def _unchanged(state: int) -> Any:
    def check(e: Env, result: Any) -> list[str]:
        job = result[-1] if isinstance(result, list) else result
        return [] if job.state == state else [f"state became {Job.State.Name(job.state)}"]

    return check


def _special() -> list[Case]:
    """Rows whose answer is OK (the check is in `then`) or that run a worker."""
    t = "spec.training."
    corrupt_data = {
        t + "train_data": lambda e: os.path.join(e.allowed, "data", "train-corrupt.tfrecord"),
        t + "epochs": 1,
        "spec.output_uri": lambda e: os.path.join(e.allowed, "out-data"),
    }
    lambda_model = {"model_uri": lambda e: os.path.join(e.allowed, "models", "lambda.keras")}
    return [
        Case("list-page-size-huge", "ListJobs", {"page_size": 2**31 - 1}, (OK,)),
        Case("cancel-finished-job", "CancelJob", {}, (OK,), then=_unchanged(Job.STATE_SUCCEEDED)),
        Case("watch-finished-job", "WatchJob", {}, (OK,), then=_unchanged(Job.STATE_SUCCEEDED)),
        Case("create-validate-only-good", "CreateJob", {"validate_only": True}, (OK,),
             worker=True, then=_validated_nothing),
        Case("create-duplicate-request-id", "CreateJob", {"request_id": "adversarial-dup-1"},
             (OK,), creates=True, then=_same_job_again),
        # The sweep deduplicates ratios; refusing them is as good. Either way nothing is made.
        Case("create-validate-only-duplicate-ratios", "CreateJob",
             {"validate_only": True, "spec.pruning.ratios": [0.3, 0.3, 0.3]},
             (IA, OK), "spec.pruning.ratios", worker=True, then=_validated_nothing),
        Case("plan-lambda-keras", "PlanPruning", lambda_model,
             (IA, grpc.StatusCode.FAILED_PRECONDITION), worker=True, names_uri="model_uri"),
        Case("job-corrupt-train-tfrecord", "CreateJob", corrupt_data, (OK,), worker=True,
             creates=True, then=_fails_naming_data),
    ]  # fmt: skip


CASES = cases() + _special()


def test_matrixIsLargeAndUnique() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_badInput(env: Env, case: Case) -> None:
    problems = run_case(env, case)
    assert not problems, f"{case.rpc} {case.id}:\n  " + "\n  ".join(problems)


def _serve(state: Path, *flags: str, timeout: float = 20) -> tuple[int | None, str]:
    cmd = [sys.executable, "-m", "secateur.server.main", "--port", "0", "--metrics-port", "-1",
           "--state-dir", str(state), *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.kill()
        return None, proc.communicate()[0]


def test_serve_refusesNonLoopbackWithoutAuth(tmp_path: Path) -> None:
    code, out = _serve(tmp_path / "state", "--host", "0.0.0.0")
    assert code == 2, f"served (or died otherwise, {code}) on 0.0.0.0 without auth: {out[-500:]}"
    assert "Traceback" not in out and "--allow-unauthenticated" in out


def test_serve_corruptStateDb_oneClearLine(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "jobs.sqlite").write_bytes(random.Random(1).randbytes(8192))
    code, out = _serve(state, "--host", "127.0.0.1")
    assert code == 2, f"exit {code} on a corrupt state DB: {out[-500:]}"
    assert "Traceback" not in out and "jobs.sqlite" in out
