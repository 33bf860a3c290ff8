"""A serving replica's record cache (server/jobstore/cache.py): its rules alone, then on a real
PostgreSQL with two replicas' stores (tests/server/pg_fixture.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from secateur.server.api.jobs import JobManager, ManagerConfig
from secateur.server.jobstore.cache import CachingPostgresJobStore, RecordCache
from secateur.server.jobstore.codec import encode_row
from secateur.server.jobstore.postgres import PostgresJobStore
from secateur.server.jobstore.records import JobRecord, JobState, now_ns

from .test_pgstore import _record


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the rules, without a database ------------------------------------------------
def test_cache_offUntilLive_keepsNothing() -> None:
    cache = RecordCache()
    assert cache.begin("a") is None
    cache.fill("a", None, _record("a"))
    assert cache.lookup("a") is None and len(cache) == 0


def test_cache_readThrough_hitUntilMaxAge() -> None:
    clock = Clock()
    cache = RecordCache(max_age_s=1.0, clock=clock)
    cache.set_live(True)
    record = _record("a")
    ticket = cache.begin("a")
    clock.now += 0.4  # the read took 0.4 s: the age counts from before it
    cache.fill("a", ticket, record)
    assert cache.lookup("a") is record
    clock.now += 0.59
    assert cache.lookup("a") is record
    clock.now += 0.02
    assert cache.lookup("a") is None and len(cache) == 0


def test_cache_invalidationDuringARead_voidsItsFill() -> None:
    cache = RecordCache()
    cache.set_live(True)
    ticket = cache.begin("a")
    cache.invalidate("a")  # a write committed while the read was in flight
    cache.fill("a", ticket, _record("a", message="old"))
    assert cache.lookup("a") is None


def test_cache_listenLost_dropsAllAndVoidsReadsInFlight() -> None:
    cache = RecordCache()
    cache.set_live(True)
    cache.fill("a", cache.begin("a"), _record("a"))
    ticket = cache.begin("b")
    cache.set_live(False)
    cache.fill("b", ticket, _record("b"))
    assert cache.lookup("a") is None and cache.lookup("b") is None
    assert cache.begin("a") is None  # bypassed until LISTEN is back
    cache.set_live(True)
    cache.fill("b", ticket, _record("b"))  # a ticket from before is void after, too
    assert cache.lookup("b") is None


def test_cache_boundedLeastRecentlyUsedFirst() -> None:
    cache = RecordCache(max_entries=2)
    cache.set_live(True)
    for job in "abc":
        if job == "c":
            assert cache.lookup("a") is not None  # a is now more recent than b
        cache.fill(job, cache.begin(job), _record(job))
    assert len(cache) == 2
    assert cache.lookup("b") is None and cache.lookup("a") is not None
    assert cache.lookup("c") is not None


def test_cache_noSuchJob_notKept() -> None:
    cache = RecordCache()
    cache.set_live(True)
    cache.fill("a", cache.begin("a"), None)
    assert len(cache) == 0


# -- two replicas on a real PostgreSQL ------------------------------------------------
@pytest.fixture
def replica_a(pg_url: str) -> Iterator[CachingPostgresJobStore]:
    # An age limit far above any wait below: what keeps it fresh is the notifications.
    opened = CachingPostgresJobStore(pg_url, max_age_s=600.0)
    assert opened._listener is not None and opened._listener.connected.wait(10)
    yield opened
    opened.close()


@pytest.fixture
def replica_b(pg_url: str) -> Iterator[CachingPostgresJobStore]:
    opened = CachingPostgresJobStore(pg_url, max_age_s=600.0)
    yield opened
    opened.close()


def _until(check: object, timeout: float) -> float:
    """Seconds until ``check()`` held; AssertionError after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.005)
    raise AssertionError(f"not within {timeout} s")


def _kept(store: CachingPostgresJobStore, record: JobRecord) -> JobRecord:
    """Insert ``record`` through ``store``, wait for its notification (arriving later
    it would drop what is read now) and read it until the cache keeps it."""
    heard = threading.Event()
    unsubscribe = store.subscribe(lambda job: heard.set() if job == record.id else None)
    store.insert(record)
    assert heard.wait(5.0)
    unsubscribe()
    job_id = record.id
    _until(lambda: store.get(job_id) is not None and store.cached(job_id) is not None, 2.0)
    kept = store.cached(job_id)
    assert kept is not None
    return kept


def _write_silently(url: str, record: JobRecord) -> None:
    """Change a row with no NOTIFY: a notification that got lost."""
    state, data, report = encode_row(record)
    with psycopg.connect(url) as conn:
        conn.execute(
            "UPDATE jobs SET state = %s, data = %s, report = %s WHERE id = %s",
            (state, data, report, record.id),
        )


def test_replicas_changeThroughB_visibleOnAWithinTheNotificationDelay(
    replica_a: CachingPostgresJobStore, replica_b: CachingPostgresJobStore
) -> None:
    replica_b.insert(_record("j"))
    _until(lambda: replica_a.get("j") is not None, 2.0)
    assert replica_a.get("j") is replica_a.get("j")  # answered from the cache
    running = _record("j", state=JobState.RUNNING, message="on b", attempts=1)
    replica_b.save(running)
    delay = _until(lambda: replica_a.get("j") == running, 2.0)
    assert delay < 1.0  # the bound (pgcache.MAX_AGE_S); the age limit here is 600 s
    assert replica_a.cached("j") == running  # and kept again


def test_replica_readsItsOwnWritesAtOnce(replica_a: CachingPostgresJobStore, pg_url: str) -> None:
    _kept(replica_a, _record("j"))
    cancelled = replica_a.request_cancel("j")
    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    assert replica_a.get("j") == cancelled  # no wait for the notification
    done = cancelled.evolve(message="edited")
    replica_a.save(done)
    assert replica_a.get("j") == done


def test_lostNotification_servedStaleAtMostMaxAge(pg_url: str) -> None:
    store = CachingPostgresJobStore(pg_url, max_age_s=0.5)
    try:
        assert store._listener is not None and store._listener.connected.wait(10)
        _kept(store, _record("j"))
        changed = _record("j", state=JobState.FAILED, message="changed silently")
        _write_silently(pg_url, changed)
        assert _until(lambda: store.get("j") == changed, 2.0) <= 0.5 + 0.1
    finally:
        store.close()


def test_listenConnectionKilled_cacheDropped_readsCorrect(
    replica_a: CachingPostgresJobStore, pg_url: str
) -> None:
    listener = replica_a._listener
    assert listener is not None
    cached = _kept(replica_a, _record("j"))
    changed = _record("j", state=JobState.FAILED, message="changed silently")
    _write_silently(pg_url, changed)
    assert replica_a.get("j") == cached  # the lost notification: still the cached one
    connects = listener.connects
    with psycopg.connect(pg_url, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN %%'"
        ).fetchall()
    assert killed == [(True,)]
    _until(lambda: listener.connects > connects and listener.connected.is_set(), 10.0)
    assert replica_a.get("j") == changed  # the cache was dropped with the connection
    assert replica_a.cache.live  # and is used again now LISTEN is back
    assert replica_a.cached("j") == changed


def test_manager_getAndWatch_answeredOffTheEventLoop(
    replica_a: CachingPostgresJobStore, replica_b: CachingPostgresJobStore, tmp_path: object
) -> None:
    replica_b.insert(_record("j"))
    cfg = ManagerConfig(str(tmp_path), max_concurrent=0)
    manager = JobManager(cfg, replica_a)

    async def scenario() -> list[JobState]:
        await manager.start()
        try:
            first = await manager.get_async("jobs/j")  # a miss: read in a thread
            assert first.state is JobState.QUEUED and replica_a.cached("j") == first
            seen: list[JobState] = []

            async def watch() -> None:
                async for record in manager.watch("jobs/j"):
                    seen.append(record.state)

            watcher = asyncio.create_task(watch())
            await asyncio.sleep(0.2)
            done = first.evolve(state=JobState.CANCELLED, end_ns=now_ns(), message="stop")
            await asyncio.to_thread(replica_b.save, done)
            await asyncio.wait_for(watcher, 1.5)  # woken by the notification, not the poll
            assert (await manager.get_async("jobs/j")) == done
            records, token = await manager.list_async(None, 10, "")
            assert [r.id for r in records] == ["j"] and token == ""
            return seen
        finally:
            await manager.shutdown()

    assert asyncio.run(scenario()) == [JobState.QUEUED, JobState.CANCELLED]


def test_workerStore_hasNoCache(pg_url: str, tmp_path: object) -> None:
    from secateur.server.jobstore import open_store

    serving = open_store(pg_url, str(tmp_path))
    working = open_store(pg_url, str(tmp_path), cache=False)
    try:
        assert isinstance(serving, CachingPostgresJobStore)
        assert type(working) is PostgresJobStore
    finally:
        serving.close()
        working.close()
