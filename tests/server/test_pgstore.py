"""The PostgreSQL job store and queue, on a real PostgreSQL (tests/server/pg_fixture.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psycopg
import pytest

from secateur.server.errors import status_of
from secateur.server.jobstore import StoreOpenError, open_store
from secateur.server.jobstore.postgres import (
    DuplicateRequestError,
    PostgresJobStore,
    StoreUnavailableError,
)
from secateur.server.jobstore.records import JobError, JobRecord, JobState, now_ns
from secateur.server.jobstore.schema import newest_version
from secateur.server.jobstore.sqlite import SqliteJobStore
from secateur.server.workers.loop import sweep_work
from secateur.v1 import pruning_pb2 as pb
from tests.server.conftest import free_port
from tests.server.pg_fixture import PostgresServer

REPORT = {"output_uri": "/served/1", "decision": "published", "curves": [[0.3, 0.01]]}


def _record(job_id: str, **changes: object) -> JobRecord:
    spec = pb.JobSpec(model_uri="/m.keras", output_uri="/served")
    fields: dict[str, object] = {
        "id": job_id,
        "spec": spec.SerializeToString(),
        "state": JobState.QUEUED,
        "create_ns": now_ns(),
        "message": "queued",
    }
    return JobRecord(**(fields | changes))  # type: ignore[arg-type]


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresJobStore]:
    opened = PostgresJobStore(pg_url)
    yield opened
    opened.close()


@pytest.fixture
def other(pg_url: str) -> Iterator[PostgresJobStore]:
    """A second store on the same database: another replica or worker."""
    opened = PostgresJobStore(pg_url)
    yield opened
    opened.close()


OPEN_ON_GO = """
import sys, threading
from secateur.server.jobstore.postgres import PostgresJobStore
opened = []
def open_store():
    PostgresJobStore(sys.argv[1]).close()
    opened.append(1)
openers = [threading.Thread(target=open_store) for _ in range(2)]
print("ready", flush=True)
sys.stdin.readline()
[t.start() for t in openers]
[t.join() for t in openers]
print("up" if len(opened) == 2 else "failed", flush=True)
"""


def test_migrations_eightOpenersInFourProcessesOnAnEmptyDatabase_allComeUp(pg_url: str) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_ON_GO, pg_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for proc in procs:  # all imported: then all open the empty database at once
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outcomes = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in outcomes] == [0] * 4, [err for _, _, err in outcomes]
    assert all(out.strip() == "up" for _, out, _ in outcomes)
    with psycopg.connect(pg_url) as conn:
        versions = conn.execute("SELECT version FROM schema_migrations ORDER BY version")
        assert versions.fetchall() == [(v,) for v in range(1, newest_version() + 1)]


def test_records_roundTripAndPageNewestFirst(
    store: PostgresJobStore, other: PostgresJobStore
) -> None:
    base = now_ns()
    for i in range(5):
        store.insert(_record(f"j{i}", create_ns=base + i, request_id=f"r{i}"))
    done = _record(
        "j2",
        create_ns=base + 2,
        request_id="r2",
        state=JobState.SUCCEEDED,
        result=REPORT,
        attempts=1,
        end_ns=base + 9,
    )
    store.save(done)
    assert other.get("j2") == done  # another replica reads what this one wrote
    assert other.by_request_id("r3") == store.get("j3")
    assert other.get("nope") is None and other.by_request_id("nope") is None

    first, key = other.page(None, None, 2)
    assert [r.id for r in first] == ["j4", "j3"] and key == (base + 3, "j3")
    second, key = other.page(None, key, 2)
    assert [r.id for r in second] == ["j2", "j1"]
    third, key = other.page(None, key, 2)
    assert [r.id for r in third] == ["j0"] and key is None
    assert other.page(JobState.SUCCEEDED, None, 10) == ([done], None)
    assert [r.id for r in other.all()] == ["j0", "j1", "j2", "j3", "j4"]


def test_requestId_fiftyConcurrentInsertsOnTwoStores_makeOneJob(
    store: PostgresJobStore, other: PostgresJobStore
) -> None:
    def create(i: int) -> str:
        target = store if i % 2 else other
        return target.insert_or_existing(_record(f"twin{i}", request_id="same")).id

    with ThreadPoolExecutor(16) as pool:
        ids = set(pool.map(create, range(50)))
    assert len(ids) == 1
    assert [r.id for r in store.all()] == list(ids)
    with pytest.raises(DuplicateRequestError) as caught:
        other.insert(_record("late", request_id="same"))
    assert caught.value.existing.id in ids


def test_claim_twoStoresManyClaimers_neverHandOneJobTwice(
    store: PostgresJobStore, other: PostgresJobStore
) -> None:
    base = now_ns()
    for i in range(30):
        store.insert(_record(f"q{i:02d}", create_ns=base + i))

    def drain(k: int) -> list[tuple[str, int]]:
        source = store if k % 2 else other
        got = []
        while (claim := source.claim(f"w{k}", 30.0, 3)) is not None:
            got.append((claim.record.id, claim.token))
        return got

    with ThreadPoolExecutor(6) as pool:
        claimed = [c for batch in pool.map(drain, range(6)) for c in batch]
    assert sorted(job for job, _ in claimed) == [f"q{i:02d}" for i in range(30)]
    assert all(token == 1 for _, token in claimed)
    assert store.counts()[JobState.RUNNING] == 30 and store.counts()[JobState.QUEUED] == 0


def test_claim_oldestFirst_runningOnTheWorkerWithALease(store: PostgresJobStore) -> None:
    base = now_ns()
    store.insert(_record("young", create_ns=base + 1))
    store.insert(_record("old", create_ns=base))
    before = time.time()
    claim = store.claim("w1", 30.0, 3)
    assert claim is not None and claim.record.id == "old"
    record = claim.record
    assert (record.state, record.attempts, record.worker) == (JobState.RUNNING, 1, "w1")
    assert before + 29 < record.lease_expires < time.time() + 31
    assert store.get("old") == record
    again = store.claim("w2", 30.0, 3)  # a leased job is not handed out again
    assert again is not None and again.record.id == "young"
    assert store.claim("w3", 30.0, 3) is None


def test_leaseExpiry_reclaimedWithAttemptsPlusOne_thenGivenUpAtTheCap(
    store: PostgresJobStore, other: PostgresJobStore
) -> None:
    store.insert(_record("a"))
    first = store.claim("w1", 0.2, 2)
    assert first is not None
    time.sleep(0.4)
    second = other.claim("w2", 0.2, 2)
    assert second is not None and second.record.id == "a"
    assert (second.record.attempts, second.record.worker) == (2, "w2")
    assert second.token > first.token
    assert not store.renew("a", first.token, 30.0).held  # the zombie learns it lost the job
    time.sleep(0.4)
    given_up = store.claim("w3", 30.0, 2)  # 2 attempts made: handed over only to end it
    assert given_up is not None and given_up.ending is not None, given_up
    assert given_up.ending.state == JobState.FAILED
    assert store.save_leased(given_up.ending, given_up.token)  # the claimer writes its end
    assert store.claim("w4", 30.0, 2) is None
    failed = store.get("a")
    assert failed is not None and failed.state == JobState.FAILED
    assert failed.error is not None and failed.error.code == grpc.StatusCode.ABORTED
    assert failed.message == "the job's worker stopped 2 times (last: w2); giving up"
    assert failed.lease_expires == 0.0


def test_staleToken_saveLeasedAndFenceRefuse(
    store: PostgresJobStore, other: PostgresJobStore
) -> None:
    store.insert(_record("b"))
    old = store.claim("w1", 0.2, 5)
    assert old is not None
    assert store.save_leased(old.record.evolve(progress=0.5, stage="PRUNING"), old.token)
    time.sleep(0.4)
    new = other.claim("w2", 30.0, 5)
    assert new is not None
    late = old.record.evolve(state=JobState.SUCCEEDED, progress=1.0, result=REPORT)
    assert not store.save_leased(late, old.token)
    assert not store.fence("b", old.token, 1.0) and not other.fence("b", old.token, 1.0)
    assert other.get("b") == new.record  # the zombie's writes changed nothing
    assert store.fence("b", new.token, 1.0)
    assert not other.fence("b", new.token, 60.0)  # less than a minute left: don't publish
    ended = new.record.evolve(state=JobState.SUCCEEDED, progress=1.0, result=REPORT)
    assert other.save_leased(ended, new.token)
    stored = store.get("b")
    assert stored is not None and stored.state == JobState.SUCCEEDED and stored.result == REPORT
    assert not other.save_leased(ended, new.token)  # ended: no more leased writes
    assert not other.renew("b", new.token, 30.0).held


def test_sweepWork_removesDirsNoLiveLeaseHolds(
    store: PostgresJobStore, other: PostgresJobStore, tmp_path: Path
) -> None:
    for job in ("run", "dead", "queued"):
        store.insert(_record(job, create_ns=now_ns()))
    running = store.claim("w1", 30.0, 3)  # "run", token 1, lease live
    dead = store.claim("w1", 0.2, 3)  # "dead": its worker was killed
    assert running is not None and dead is not None
    time.sleep(0.4)
    reclaimed = other.claim("w2", 30.0, 3)  # elsewhere, under token 2
    assert reclaimed is not None and (reclaimed.record.id, reclaimed.token) == ("dead", 2)
    work = tmp_path / "work"
    names = ["run-1", "run-0", "dead-1", "queued-0", "gone-3", "plan-12345678", "notes"]
    for name in names:
        (work / name / "model").mkdir(parents=True)
    assert sweep_work(str(tmp_path), store) == ["dead-1", "gone-3", "queued-0", "run-0"]
    assert sorted(p.name for p in work.iterdir()) == ["notes", "plan-12345678", "run-1"]
    assert sweep_work(str(tmp_path / "nothing-here"), store) == []


def test_fence_extendsTheLease(store: PostgresJobStore) -> None:
    store.insert(_record("f"))
    claim = store.claim("w1", 3.0, 3)
    assert claim is not None
    assert store.fence("f", claim.token, 5.0) is False  # 3 s left < 5 s asked
    assert store.fence("f", claim.token, 1.0)
    extended = store.get("f")
    assert extended is not None and extended.lease_expires >= claim.record.lease_expires


def test_fence_recordsTheVersionToPublish_theNextClaimGetsIt(
    store: PostgresJobStore, other: PostgresJobStore
) -> None:
    store.insert(_record("p"))
    first = store.claim("w1", 0.5, 3)
    assert first is not None and first.publish_uri == ""
    assert store.fence("p", first.token, 0.1, "gs://b/out/3")  # recorded with the yes
    assert not store.fence("p", first.token + 1, 0.1, "gs://b/out/9")  # a refusal records nothing
    time.sleep(0.6)  # the worker dies after publishing: its lease runs out
    again = other.claim("w2", 30.0, 3)
    assert again is not None and (again.token, again.publish_uri) == (
        first.token + 1,
        "gs://b/out/3",
    )


def test_givenUpWithARecordedVersion_isClaimedOnlyToSettleIt_itsCancelKept(
    store: PostgresJobStore, other: PostgresJobStore
) -> None:
    """A job not to run again (attempts spent, cancel pending) whose fence recorded a
    version is handed to a claimer with its end (Claim.ending): the claimer settles that
    version (workers/lifecycle.settled) before writing the end; a job with none is handed
    over the same way (its checkpoints are the claimer's to remove), never ended in the
    claim."""
    for job in ("s", "c", "n"):
        store.insert(_record(job))
    first = {job: store.claim("w1", 0.5, 1) for job in ("s", "c", "n")}
    assert all(first.values())
    assert store.fence("s", first["s"].token, 0.1, "gs://b/out/1")  # type: ignore[union-attr]
    assert store.fence("c", first["c"].token, 0.1, "gs://b/out/2")  # type: ignore[union-attr]
    store.request_cancel("c")
    time.sleep(0.6)  # w1 died mid-publish: its leases run out
    again = {}
    for _ in range(3):
        claim = other.claim("w2", 30.0, 1)
        assert claim is not None and claim.ending is not None, claim
        again[claim.record.id] = claim
    assert other.claim("w2", 30.0, 1) is None
    s, c, n = again["s"], again["c"], again["n"]
    assert (n.publish_uri, n.ending.state) == ("", JobState.FAILED)  # type: ignore[union-attr]
    assert other.save_leased(n.ending, n.token)  # type: ignore[arg-type]
    assert other.get("n").state is JobState.FAILED  # type: ignore[union-attr]
    assert (s.publish_uri, s.ending.state, s.ending.attempts) == (  # type: ignore[union-attr]
        "gs://b/out/1", JobState.FAILED, 1,
    )  # fmt: skip
    assert (c.publish_uri, c.ending.state) == ("gs://b/out/2", JobState.CANCELLED)  # type: ignore[union-attr]
    assert other.renew("c", c.token, 30.0).cancel_requested  # kept while it settles
    assert not other.fence("c", c.token, 0.1, "gs://b/out/2")  # nothing is published now
    assert other.save_leased(s.ending, s.token)  # type: ignore[arg-type]
    assert other.get("s").state is JobState.FAILED  # type: ignore[union-attr]


def test_requestCancel_queuedWithARecordedVersion_isEndedByTheNextClaimToSettleIt(
    store: PostgresJobStore, other: PostgresJobStore
) -> None:
    """A job handed back after its fence recorded a version (its worker stopped mid
    publish) and then cancelled is not ended in the store, which cannot settle that
    version: the next claim hands it over with its CANCELLED end (Claim.ending)."""
    store.insert(_record("q"))
    first = store.claim("w1", 30.0, 3)
    assert first is not None and store.fence("q", first.token, 0.1, "gs://b/out/1")
    assert store.save_leased(first.record.evolve(state=JobState.QUEUED), first.token)
    assert store.request_cancel("q").state is JobState.QUEUED  # type: ignore[union-attr]
    claim = other.claim("w2", 30.0, 3)
    assert claim is not None and claim.ending is not None, claim
    assert (claim.publish_uri, claim.ending.state) == ("gs://b/out/1", JobState.CANCELLED)
    assert claim.ending.attempts == 1  # it does not run again


def test_requestCancel_queuedEndsAtOnce_runningIsFlaggedForItsWorker(
    store: PostgresJobStore, other: PostgresJobStore
) -> None:
    store.insert(_record("q", create_ns=now_ns() + 10**9))  # claimed last
    store.insert(_record("r"))
    running = store.claim("w1", 30.0, 3)
    assert running is not None and running.record.id == "r"

    cancelled = other.request_cancel("q")
    assert cancelled is not None and cancelled.state == JobState.CANCELLED
    assert cancelled.error == JobError(grpc.StatusCode.CANCELLED, "cancelled while queued")
    assert store.get("q") == cancelled and store.claim("w2", 30.0, 3) is None

    flagged = other.request_cancel("r")
    assert flagged is not None and flagged.state == JobState.RUNNING
    lease = store.renew("r", running.token, 30.0)
    assert lease.held and lease.cancel_requested
    assert not store.fence("r", running.token, 1.0)  # a job being cancelled never publishes
    ended = running.record.evolve(state=JobState.CANCELLED, message="cancelled")
    assert store.save_leased(ended, running.token)
    assert other.request_cancel("r") == store.get("r")  # ended: left as it is
    assert other.request_cancel("missing") is None


def test_requestCancel_ofAJobWhoseWorkerDied_endsCancelledOnReclaim(
    store: PostgresJobStore,
) -> None:
    store.insert(_record("d"))
    assert store.claim("w1", 0.2, 3) is not None
    store.request_cancel("d")
    time.sleep(0.4)
    claim = store.claim("w2", 30.0, 3)  # handed over only to end it (Claim.ending)
    assert claim is not None and claim.ending is not None, claim
    assert (claim.ending.state, claim.ending.attempts) == (JobState.CANCELLED, 1)
    assert store.claim("w3", 30.0, 3) is None  # not run again
    assert store.save_leased(claim.ending, claim.token)
    ended = store.get("d")
    assert ended is not None and ended.state == JobState.CANCELLED


def test_counts_everyStateFromTheDatabase(store: PostgresJobStore, other: PostgresJobStore) -> None:
    assert set(store.counts().values()) == {0}
    for i in range(4):
        store.insert(_record(f"c{i}"))
    store.save(_record("c3", state=JobState.FAILED))
    assert other.claim("w", 30.0, 3) is not None
    counts = other.counts()
    assert counts[JobState.QUEUED] == 2 and counts[JobState.RUNNING] == 1
    assert counts[JobState.FAILED] == 1 and counts[JobState.SUCCEEDED] == 0


def _hear(store: PostgresJobStore) -> tuple[list[str | None], threading.Event]:
    heard: list[str | None] = []
    event = threading.Event()

    def callback(job_id: str | None) -> None:
        heard.append(job_id)
        if job_id is not None:
            event.set()

    store.subscribe(callback)
    return heard, event


def test_notify_wakesASubscriberOfAnotherStoreWithinASecond(
    store: PostgresJobStore, other: PostgresJobStore
) -> None:
    heard, event = _hear(store)
    assert store._listener is not None and store._listener.connected.wait(10)
    start = time.monotonic()
    other.insert(_record("n"))
    assert event.wait(1.0), heard
    assert time.monotonic() - start < 1.0 and "n" in heard


def test_subscribers_hearNoneAtLeastEveryPollInterval(pg_url: str) -> None:
    store = PostgresJobStore(pg_url, poll_s=0.3)
    try:
        heard, _ = _hear(store)
        time.sleep(1.2)
        assert heard.count(None) >= 3
    finally:
        store.close()


def test_postgresRestart_poolAndListenerReconnect(
    pg_server: PostgresServer, store: PostgresJobStore, other: PostgresJobStore
) -> None:
    store.insert(_record("before"))
    heard, _ = _hear(store)
    assert store._listener is not None and store._listener.connected.wait(10)
    pg_server.restart()
    assert store.get("before") is not None  # the pool replaced its dead connections
    other.insert(_record("after"))
    deadline = time.monotonic() + 10
    while "after" not in heard and time.monotonic() < deadline:
        # notifications sent before the listener reconnected are lost: write again
        time.sleep(0.5)
        other.save(_record("after", message="again"))
    assert "after" in heard and None in heard
    assert [r.id for r in store.all()] == ["before", "after"]


def test_postgresDown_callsFailUnavailable_thenWorkAgain(
    pg_server: PostgresServer, pg_url: str
) -> None:
    store = PostgresJobStore(pg_url, connect_timeout_s=1.0)
    try:
        store.insert(_record("kept"))
        pg_server.stop()
        try:
            with pytest.raises(StoreUnavailableError, match=r"did not answer .*retry"):
                store.get("kept")
        finally:
            pg_server.start()
        status = status_of(StoreUnavailableError("x"))
        assert status is not None and status.code == grpc.StatusCode.UNAVAILABLE
        kept = store.get("kept")
        assert kept is not None and kept.state == JobState.QUEUED
    finally:
        store.close()


def test_openStore_choosesByUrl(pg_url: str, tmp_path: Path) -> None:
    default = open_store("", str(tmp_path))
    assert isinstance(default, SqliteJobStore) and default.path == str(tmp_path / "jobs.sqlite")
    default.close()
    named = open_store(f"sqlite://{tmp_path}/elsewhere/jobs.sqlite", str(tmp_path))
    assert isinstance(named, SqliteJobStore)
    assert named.path == str(tmp_path / "elsewhere" / "jobs.sqlite")
    named.close()
    shared = open_store(pg_url, str(tmp_path))
    assert isinstance(shared, PostgresJobStore)
    shared.close()


@pytest.mark.parametrize(
    ("url", "echo"),
    [
        ("mysql://u:secret@h/db", "Received: mysql://u:***@h/db"),
        ("/var/lib/jobs.sqlite", "Received: /var/lib/jobs.sqlite"),
    ],
)
def test_openStore_unknownScheme_saysWhatIsAccepted(url: str, echo: str, tmp_path: Path) -> None:
    with pytest.raises(StoreOpenError) as caught:
        open_store(url, str(tmp_path))
    assert "must start with sqlite:/// or postgresql://" in str(caught.value)
    assert str(caught.value).endswith(echo) and "secret" not in str(caught.value)


def test_openStore_relativeSqlitePath_isRefused(tmp_path: Path) -> None:
    with pytest.raises(StoreOpenError, match=r"absolute path .*Received: sqlite://jobs.sqlite$"):
        open_store("sqlite://jobs.sqlite", str(tmp_path))


def test_unreachableServer_isAStoreOpenErrorNamingIt() -> None:
    port = free_port()
    with pytest.raises(StoreOpenError) as caught:
        PostgresJobStore(f"postgresql://app:pw@127.0.0.1:{port}/jobs", connect_timeout_s=1.0)
    message = str(caught.value)
    assert f"127.0.0.1:{port}/jobs as app" in message and ":pw@" not in message
