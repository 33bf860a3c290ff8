"""Issue 18, items 1 and 3: one version per job, and cancels that outlive their worker.

Real replicas, ``secateur worker`` processes and a real PostgreSQL (test_scaleout's
Cluster), and a real embedded ``secateur serve``; each job process is stopped at
the exact point a test means with server/holds.py. A job whose version was
published is never run again and never fails for its own output: its next
attempt finds the version its fence recorded, sees its own marker and content,
and ends SUCCEEDED from the report in it (server/pipeline/publish.py).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pb_grpc
from tests.server import test_scaleout as scaleout
from tests.server.conftest import free_port
from tests.server.test_scaleout import (
    CANCELLED,
    CLI,
    ENDED,
    QUEUED,
    SUCCEEDED,
    Cluster,
    create,
    get,
    published,
    spec,
    wait_for,
)

tiny_model = scaleout.tiny_model  # the fixtures, shared with test_scaleout
cluster = scaleout.cluster


def _succeeded_once(cluster: Cluster, api: pb_grpc.PruningServiceStub, name: str) -> pb.Job:
    """The job ends SUCCEEDED on w2's attempt 2 from the version attempt 1 published."""
    done = wait_for(api, name, lambda j: j.state in ENDED, 120)
    assert (done.state, done.attempts, done.worker) == (SUCCEEDED, 2, "w2"), done
    assert done.result.output_uri == str(cluster.root / "out" / "1")
    assert done.result.pruned.params > 0  # the report read back from the version
    assert published(cluster, "out") == ["1"]
    return done


def test_sigtermRightAfterThePublish_rerunFindsItsVersion_succeededWithOne(
    cluster: Cluster,
) -> None:
    api = cluster.replica("api")
    cluster.arm("published")  # the version is complete; the job has not reported it
    cluster.worker("w1")
    job = create(api, spec(cluster, "out"))
    cluster.reached("published")
    assert published(cluster, "out") == ["1"]
    cluster.procs["w1"].terminate()  # a scale-down: the job is handed back
    assert cluster.procs["w1"].wait(timeout=60) == 0
    back = get(api, job.name)
    assert back is not None and (back.state, back.attempts) == (QUEUED, 1), back
    cluster.release("published")
    cluster.worker("w2")
    _succeeded_once(cluster, api, job.name)


@pytest.mark.slow  # two workers, two job processes and a lease to run out (~40 s on 2 cores)
def test_parentStallsAfterItsFence_jobPublishes_nextWorkerConcludesFromIt(
    cluster: Cluster,
) -> None:
    api = cluster.replica("api")
    cluster.arm("fenced")
    w1 = cluster.worker("w1")
    job = create(api, spec(cluster, "out"))
    cluster.reached("fenced")
    os.kill(w1.pid, signal.SIGSTOP)  # the worker stalls; its job process goes on
    cluster.release("fenced")
    version = cluster.root / "out" / "1"
    deadline = time.monotonic() + 60
    while not (version / "saved_model.pb").exists() or published(cluster, "out") != ["1"]:
        assert time.monotonic() < deadline, published(cluster, "out")
        time.sleep(0.1)
    cluster.worker("w2")  # claims the job once w1's lease ran out
    _succeeded_once(cluster, api, job.name)
    os.kill(w1.pid, signal.SIGCONT)  # the zombie's conclusion is fenced out
    deadline = time.monotonic() + 30
    while not _gave_up(cluster.log("w1")) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _gave_up(cluster.log("w1")), cluster.log("w1")[-2000:]
    final = get(api, job.name)
    assert final is not None and (final.state, final.worker) == (SUCCEEDED, "w2")
    assert published(cluster, "out") == ["1"]


def _gave_up(log: str) -> bool:
    """The worker's log says it found its lease gone (renewal) or its write refused."""
    return "lost its lease" in log or "fenced out" in log


class Proxy:
    """A TCP forwarder to ``port`` that a test can cut (a store outage for one process)."""

    def __init__(self, port: int) -> None:
        self.target, self.port = port, free_port()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        assert self._listener is not None
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self._listener.close()
        self._listener = None
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            if self._listener is not listener:  # cut while accepting
                client.close()
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.mark.slow  # two workers, two job processes and an outage past the lease (~45 s)
def test_storeOutageLongerThanTheLeaseAtTheJobsEnd_jobSucceedsWithOneVersion(
    cluster: Cluster,
) -> None:
    api = cluster.replica("api")
    port = int(cluster.url.rsplit(":", 1)[1].split("/")[0])
    proxy = Proxy(port)
    cluster.arm("published")
    cluster.worker("w1", url=cluster.url.replace(f":{port}/", f":{proxy.port}/"))
    job = create(api, spec(cluster, "out"))
    cluster.reached("published")
    proxy.cut()  # w1 cannot conclude (nor renew) for longer than its 3 s lease
    cluster.release("published")
    deadline = time.monotonic() + 30
    while "storing it failed" not in cluster.log("w1") and "lost its lease" not in cluster.log(
        "w1"
    ):
        assert time.monotonic() < deadline, cluster.log("w1")[-3000:]
        time.sleep(0.2)
    running = get(api, job.name)
    assert running is not None and running.state == pb.Job.STATE_RUNNING, running
    cluster.worker("w2")
    _succeeded_once(cluster, api, job.name)
    proxy.restore()
    time.sleep(2)  # w1 is back on the store: it has nothing more to write
    final = get(api, job.name)
    assert final is not None and (final.state, final.worker) == (SUCCEEDED, "w2")


# -- item 3 on the embedded store: a cancel outlives the server process ---------


@pytest.fixture
def local(tmp_path: Path, tiny_model: str) -> Iterator[Cluster]:
    c = Cluster("", tmp_path, tiny_model)
    try:
        yield c
    finally:
        c.stop()


def _serve(local: Cluster) -> pb_grpc.PruningServiceStub:
    """``secateur serve`` on the embedded SQLite store in ``<root>/state``, running jobs."""
    port = free_port()
    local._start("serve", [
        *CLI, "serve", "--port", str(port), "--metrics-port", "-1",
        "--state-dir", str(local.root / "state"), "--max-concurrent-jobs", "1",
        "--allowed-uri-prefix", str(local.root), "--allowed-uri-prefix", local.model,
        "--shutdown-grace-seconds", "0",
    ])  # fmt: skip
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=90)
    return pb_grpc.PruningServiceStub(channel)


def test_embeddedStore_cancelPendingWhenTheServerDies_endsCancelledAfterRestart(
    local: Cluster,
) -> None:
    api = _serve(local)
    local.arm("exporting")  # the job waits there; SIGTERM does not end the wait
    job = create(api, spec(local, "out"))
    local.reached("exporting")
    answer = api.CancelJob(pb.CancelJobRequest(name=job.name), timeout=30)
    assert answer.state == pb.Job.STATE_RUNNING  # requested; its worker has not ended it
    local.signal("serve", signal.SIGKILL)  # the server dies with the cancel pending
    local.procs["serve"].wait(timeout=30)
    local.release("exporting")
    api = _serve(local)
    done = wait_for(api, job.name, lambda j: j.state in ENDED, 60)
    assert (done.state, done.attempts) == (CANCELLED, 1), done  # not run again
    time.sleep(1)
    assert published(local, "out") == []
