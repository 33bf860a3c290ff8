"""Scaled out on PostgreSQL: API-only replicas and `secateur worker`s as real processes.

Every test gets a fresh database on the session's PostgreSQL
(tests/server/pg_fixture.py) and starts real ``secateur serve --store
postgresql://...`` replicas and ``secateur worker`` processes on loopback; jobs
prune a tiny model so each takes a few seconds. Workers run in their own
process group, so SIGKILL/SIGSTOP reach the job subprocesses too (as when a
machine dies or stalls).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from secateur.server.holds import HOLD_ENV
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pb_grpc
from tests.server.conftest import free_port
from tests.server.pg_fixture import PostgresServer

CLI = [sys.executable, "-m", "secateur.cli"]
QUEUED, RUNNING = pb.Job.STATE_QUEUED, pb.Job.STATE_RUNNING
SUCCEEDED, CANCELLED = pb.Job.STATE_SUCCEEDED, pb.Job.STATE_CANCELLED
ENDED = {SUCCEEDED, pb.Job.STATE_FAILED, CANCELLED}
LEASE_S = 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small conv net (built in a subprocess: this process stays free of TensorFlow)."""
    path = tmp_path_factory.mktemp("scaleout-model") / "tiny.keras"
    code = (
        "import sys, keras\n"
        "i = keras.Input((32, 32, 3))\n"
        "x = keras.layers.Conv2D(16, 3, padding='same')(i)\n"
        "x = keras.layers.BatchNormalization()(x)\n"
        "x = keras.layers.ReLU()(x)\n"
        "x = keras.layers.Conv2D(16, 3, padding='same')(x)\n"
        "x = keras.layers.GlobalAveragePooling2D()(x)\n"
        "keras.Model(i, keras.layers.Dense(4)(x)).save(sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)
    return str(path)


class Cluster:
    """Replicas and workers on one database; every process is stopped at the end.

    Their job processes stop at the points a test arms in ``holds`` (server/holds.py).
    """

    def __init__(self, url: str, root: Path, model: str) -> None:
        self.url, self.root, self.model = url, root, model
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.targets: dict[str, str] = {}
        self.holds = root / "holds"
        self.holds.mkdir(exist_ok=True)

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1", HOLD_ENV: str(self.holds)},
        )  # fmt: skip
        log.close()
        self.procs[name] = proc
        return proc

    def replica(
        self, name: str, max_concurrent: int = 0, metrics_port: int = -1
    ) -> pb_grpc.PruningServiceStub:
        """An API replica (``max_concurrent`` > 0: it runs jobs too); its stub once it serves."""
        port = free_port()
        self._start(name, [
            *CLI, "serve", "--port", str(port), "--metrics-port", str(metrics_port),
            "--state-dir", str(self.root / name), "--store", self.url,
            "--max-concurrent-jobs", str(max_concurrent),
            "--allowed-uri-prefix", str(self.root), "--allowed-uri-prefix", self.model,
            "--shutdown-grace-seconds", "0",
        ])  # fmt: skip
        self.targets[name] = f"127.0.0.1:{port}"
        channel = grpc.insecure_channel(self.targets[name])
        grpc.channel_ready_future(channel).result(timeout=90)
        return pb_grpc.PruningServiceStub(channel)

    def worker(
        self, name: str, lease_s: float = LEASE_S, extra: Sequence[str] = (), url: str = ""
    ) -> subprocess.Popen[bytes]:
        return self._start(name, [
            *CLI, "worker", "--store", url or self.url, "--state-dir", str(self.root / name),
            "--worker-id", name, "--lease-seconds", str(lease_s),
            "--allowed-uri-prefix", str(self.root), "--allowed-uri-prefix", self.model, *extra,
        ])  # fmt: skip

    def signal(self, name: str, sig: int) -> None:
        """``sig`` to the process and its job subprocesses (its process group)."""
        os.killpg(self.procs[name].pid, sig)

    def arm(self, point: str) -> None:
        """Job processes reaching ``point`` wait there until :meth:`release`."""
        (self.holds / point).touch()

    def reached(self, point: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not (self.holds / f"{point}.reached").exists():
            assert time.monotonic() < deadline, f"no job process reached {point} in {timeout} s"
            time.sleep(0.1)

    def release(self, point: str) -> None:
        (self.holds / point).unlink()

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path, tiny_model: str) -> Iterator[Cluster]:
    c = Cluster(pg_url, tmp_path, tiny_model)
    try:
        yield c
    finally:
        c.stop()


def spec(cluster: Cluster, out: str, measure_steps: int = 5) -> pb.JobSpec:
    return pb.JobSpec(
        model_uri=cluster.model,
        output_uri=str(cluster.root / out),
        pruning=pb.PruningSpec(ratio=0.25),
        training=pb.TrainingSpec(epochs=0, measure_steps=measure_steps, batch_size=8),
    )


def create(stub: pb_grpc.PruningServiceStub, job_spec: pb.JobSpec, request_id: str = "") -> pb.Job:
    return stub.CreateJob(pb.CreateJobRequest(spec=job_spec, request_id=request_id), timeout=60)


def get(stub: pb_grpc.PruningServiceStub, name: str) -> pb.Job | None:
    """The job, or None while the replica cannot answer (PostgreSQL restarting)."""
    try:
        return stub.GetJob(pb.GetJobRequest(name=name), timeout=10)
    except grpc.RpcError as err:
        if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return None
        raise


def wait_for(
    stub: pb_grpc.PruningServiceStub, name: str, done: Callable[[pb.Job], bool], timeout: float
) -> pb.Job:
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = get(stub, name)
        if job is not None and done(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"{name} did not get there in {timeout} s; last seen: {job}")


def names_and_states(stub: pb_grpc.PruningServiceStub) -> list[tuple[str, int]]:
    answer = stub.ListJobs(pb.ListJobsRequest(page_size=100), timeout=30)
    return [(job.name, job.state) for job in answer.jobs]


def published(cluster: Cluster, out: str) -> list[str]:
    """Everything under the job's output base (versions and any staging leftovers)."""
    base = cluster.root / out
    return sorted(os.listdir(base)) if base.exists() else []


@pytest.mark.slow  # about a minute on two cores: six jobs, each its own TensorFlow process
def test_twoReplicasTwoWorkers_sixJobsSucceed_readThroughTheOther(cluster: Cluster) -> None:
    a, b = cluster.replica("api-a"), cluster.replica("api-b")
    cluster.worker("w1")
    cluster.worker("w2")
    jobs = [create(a, spec(cluster, f"out{i}")) for i in range(6)]
    ended = [wait_for(b, job.name, lambda j: j.state in ENDED, 240) for job in jobs]
    assert [j.state for j in ended] == [SUCCEEDED] * 6, [j.error.message for j in ended]
    assert {j.worker for j in ended} <= {"w1", "w2"}
    for i, job in enumerate(ended):
        assert job.result.output_uri == str(cluster.root / f"out{i}" / "1")
        assert published(cluster, f"out{i}") == ["1"]
    listed = names_and_states(a)
    assert listed == names_and_states(b)
    assert sorted(listed) == sorted((j.name, SUCCEEDED) for j in jobs)


def test_workerKilled_jobReclaimedAfterItsLease_publishedOnce(cluster: Cluster) -> None:
    api = cluster.replica("api")
    cluster.worker("w1")
    job = create(api, spec(cluster, "out", measure_steps=50))
    wait_for(api, job.name, lambda j: j.state == RUNNING and j.worker == "w1", 120)
    status = subprocess.run(
        [*CLI, "status", job.name, "--server", cluster.targets["api"]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "worker: w1  lease expires" in status.stdout, status.stdout + status.stderr
    cluster.signal("w1", signal.SIGKILL)
    cluster.worker("w2")
    done = wait_for(api, job.name, lambda j: j.state in ENDED, 180)
    assert (done.state, done.worker, done.attempts) == (SUCCEEDED, "w2", 2), done.error.message
    assert published(cluster, "out") == ["1"]  # one complete version, no staging dirs


def test_stalledWorkerPastItsLease_publishesNothing(cluster: Cluster) -> None:
    api = cluster.replica("api")
    cluster.worker("w1")
    job = create(api, spec(cluster, "out", measure_steps=50))
    wait_for(api, job.name, lambda j: j.state == RUNNING and j.worker == "w1", 120)
    cluster.signal("w1", signal.SIGSTOP)  # the worker and its job's process stall
    cluster.worker("w2")
    done = wait_for(api, job.name, lambda j: j.state in ENDED, 180)
    assert (done.state, done.worker, done.attempts) == (SUCCEEDED, "w2", 2), done.error.message
    assert published(cluster, "out") == ["1"]
    cluster.signal("w1", signal.SIGCONT)  # the zombie wakes up with a stale token
    deadline = time.monotonic() + 30
    while "lost its lease" not in cluster.log("w1") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "lost its lease" in cluster.log("w1")
    final = get(api, job.name)
    assert final is not None and (final.state, final.worker) == (SUCCEEDED, "w2")
    assert published(cluster, "out") == ["1"]


def test_cancelThroughOneReplica_stopsTheJobRunningBesideTheOther(cluster: Cluster) -> None:
    a = cluster.replica("api-a")
    b = cluster.replica("api-b", max_concurrent=1)  # runs jobs in its own worker loop
    job = create(a, spec(cluster, "out", measure_steps=400))
    wait_for(a, job.name, lambda j: j.state == RUNNING and j.stage != 0, 120)
    a.CancelJob(pb.CancelJobRequest(name=job.name), timeout=30)
    started = time.monotonic()
    done = wait_for(a, job.name, lambda j: j.state in ENDED, 10)
    assert done.state == CANCELLED, done
    assert time.monotonic() - started < 10
    assert wait_for(b, job.name, lambda j: True, 5).state == CANCELLED
    time.sleep(1)
    assert published(cluster, "out") == []


def test_fiftyConcurrentCreates_oneRequestId_overBothReplicas_makeOneJob(
    cluster: Cluster,
) -> None:
    ports = [free_port(), free_port()]
    stubs = [cluster.replica(f"api-{i}", metrics_port=port) for i, port in enumerate(ports)]
    job_spec = spec(cluster, "out")
    with ThreadPoolExecutor(50) as pool:
        jobs = list(pool.map(lambda i: create(stubs[i % 2], job_spec, "one-id"), range(50)))
    assert len({job.name for job in jobs}) == 1
    assert [name for name, _ in names_and_states(stubs[0])] == [jobs[0].name]
    assert names_and_states(stubs[1]) == names_and_states(stubs[0])
    for port in ports:  # queue depth comes from the store: both replicas count the one job
        assert _gauge(port, "secateur_jobs_queued", want=1.0) == 1.0
        assert _gauge(port, "secateur_jobs_running", want=0.0) == 0.0


def _gauge(port: int, name: str, want: float, timeout: float = 15) -> float | None:
    """The gauge's value on the /metrics page at ``port`` once it is ``want`` (or the last)."""
    import urllib.request

    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            for line in page.read().decode().splitlines():
                if line.startswith(name + " "):
                    value = float(line.split()[1])
        if value == want:
            break
        time.sleep(0.5)
    return value


@pytest.mark.slow  # restarts the session's PostgreSQL under every other test's database
def test_postgresRestartedMidJob_everyoneReconnects_noJobLostOrDuplicated(
    cluster: Cluster, pg_server: PostgresServer
) -> None:
    api = cluster.replica("api")
    cluster.worker("w1", lease_s=8)
    jobs = [create(api, spec(cluster, f"out{i}", measure_steps=50)) for i in range(2)]
    wait_for(api, jobs[0].name, lambda j: j.state == RUNNING, 120)
    pg_server.restart()
    ended = [wait_for(api, job.name, lambda j: j.state in ENDED, 240) for job in jobs]
    assert [j.state for j in ended] == [SUCCEEDED] * 2, [j.error.message for j in ended]
    assert sorted(names_and_states(api)) == sorted((j.name, SUCCEEDED) for j in jobs)
    for i in range(2):
        assert published(cluster, f"out{i}") == ["1"]
    late = create(api, spec(cluster, "out-late"))  # and new work still flows
    assert wait_for(api, late.name, lambda j: j.state in ENDED, 120).state == SUCCEEDED


def test_workerStoppedBySigterm_handsItsJobBack_anotherFinishesIt(cluster: Cluster) -> None:
    api = cluster.replica("api")
    cluster.worker("w1")
    job = create(api, spec(cluster, "out", measure_steps=50))
    wait_for(api, job.name, lambda j: j.state == RUNNING and j.worker == "w1", 120)
    cluster.procs["w1"].terminate()
    assert cluster.procs["w1"].wait(timeout=30) == 0
    back = get(api, job.name)
    assert back is not None and back.state == QUEUED, back  # at once, not after the lease
    cluster.worker("w2")
    done = wait_for(api, job.name, lambda j: j.state in ENDED, 180)
    assert (done.state, done.worker, done.attempts) == (SUCCEEDED, "w2", 2), done.error.message
    assert published(cluster, "out") == ["1"]
