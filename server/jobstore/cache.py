"""A replica's cache of job records, kept fresh by PostgreSQL's change notifications.

GetJob and WatchJob read one job by id, over and over (a CI pipeline polls
its job; hundreds of watchers re-read theirs on every wake-up). On a shared
store each read was a pool checkout and three round trips. A serving
replica's :class:`CachingPostgresJobStore` answers them from memory instead:

- **Read-through.** A miss reads the database and keeps the record (a job
  that does not exist is not kept). At most ``max_entries`` records are
  kept, the least recently used dropped first.
- **Invalidation by NOTIFY.** Every write of any process NOTIFYs the job's
  id at commit (server/jobstore/postgres.py); this replica's LISTEN thread
  (server/jobstore/listen.py) drops that id before it wakes any watcher, so a woken
  watcher reads the new record. A read that began before a write and ends
  after its notification does not keep what it read (:meth:`RecordCache.begin`
  hands out a ticket that the invalidation voids).
- **Read-your-writes.** This store's own writes drop the id as soon as they
  commit, before they return, without waiting for the notification.
- **LISTEN lost: cache off.** When the LISTEN connection drops (PostgreSQL
  restarted, the backend terminated, a network cut), notifications are lost:
  the cache is emptied and every read goes to the database until LISTEN is
  back; then it starts empty again.
- **A hard bound.** A record is kept at most ``max_age_s`` (default 1 s),
  counted from before the read that fetched it, whatever happens to the
  notifications (a half-open TCP connection that looks alive delivers
  nothing and reports no error).

Staleness across replicas is therefore: a read on any replica reflects
every write committed at least ``max_age_s`` earlier; in practice it
reflects a write within the notification's delivery time (milliseconds),
and a replica's own writes at once. Lease renewals and the job subprocess's
fence check do not NOTIFY (see jobstore.postgres), so the lease expiry a read shows
can lag by up to ``max_age_s`` — as it could before by a renewal period.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from secateur.server.jobstore.interface import Claim
from secateur.server.jobstore.listen import Listener
from secateur.server.jobstore.postgres import PostgresJobStore
from secateur.server.jobstore.records import JobRecord

#: Records kept per replica (about 2 KiB each with a report: ~20 MiB at most).
MAX_ENTRIES = 10_000
#: The longest a kept record is answered without reading the database again.
MAX_AGE_S = 1.0


class RecordCache:
    """Job records by id with tickets, an age limit and an on/off switch (thread-safe).

    Args:
        max_entries: the most records kept (least recently used dropped first).
        max_age_s: how long a record is kept, from before the read that fetched it.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self, max_entries: int = MAX_ENTRIES, max_age_s: float = MAX_AGE_S, clock: Any = None
    ) -> None:
        self.max_entries = max(1, max_entries)
        self.max_age_s = max_age_s
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._records: OrderedDict[str, tuple[float, JobRecord]] = OrderedDict()
        self._tickets: dict[str, object] = {}
        self._live = False  # off until LISTEN runs: nothing would invalidate

    @property
    def live(self) -> bool:
        return self._live

    def lookup(self, job_id: str) -> JobRecord | None:
        """The kept record of ``job_id``; None when there is none fresh enough."""
        with self._lock:
            kept = self._records.get(job_id)
            if kept is not None and self._clock() < kept[0]:
                self._records.move_to_end(job_id)
                return kept[1]
            if kept is not None:
                del self._records[job_id]
            return None

    def begin(self, job_id: str) -> object | None:
        """A ticket to :meth:`fill` ``job_id`` with what a read starting now finds;
        None while the cache is off. A write's invalidation voids it."""
        with self._lock:
            if not self._live:
                return None
            ticket = (self._clock() + self.max_age_s, object())
            self._tickets[job_id] = ticket
            return ticket

    def fill(self, job_id: str, ticket: object | None, record: JobRecord | None) -> None:
        """Keep ``record``, unless the ticket was voided (a write or a LISTEN loss since)."""
        with self._lock:
            if ticket is None or self._tickets.get(job_id) is not ticket:
                return
            del self._tickets[job_id]
            if record is None or not self._live:
                return
            self._records[job_id] = (ticket[0], record)  # type: ignore[index]
            self._records.move_to_end(job_id)
            while len(self._records) > self.max_entries:
                self._records.popitem(last=False)

    def invalidate(self, job_id: str | None) -> None:
        """Forget ``job_id`` (a write to it committed); None is ignored (a poll tick)."""
        if job_id is None:
            return
        with self._lock:
            self._records.pop(job_id, None)
            self._tickets.pop(job_id, None)

    def set_live(self, live: bool) -> None:
        """LISTEN started (True) or stopped (False): either way start empty."""
        with self._lock:
            self._live = live
            self._records.clear()
            self._tickets.clear()

    def __len__(self) -> int:
        return len(self._records)


class CachingPostgresJobStore(PostgresJobStore):
    """:class:`PostgresJobStore` whose reads by id go through a :class:`RecordCache`.

    The store for a serving replica (``secateur serve --store postgresql://``);
    workers use the plain store (they read nothing twice). Takes the
    arguments of PostgresJobStore, plus ``max_entries`` and ``max_age_s``.
    """

    def __init__(
        self,
        url: str,
        *args: Any,
        max_entries: int = MAX_ENTRIES,
        max_age_s: float = MAX_AGE_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(url, *args, **kwargs)
        self.cache = RecordCache(max_entries, max_age_s)
        # First subscriber: an id is dropped before any watcher is woken for it.
        self._listener = Listener(self.url, self._poll_s, on_connection=self.cache.set_live)
        self._listener.subscribe(self.cache.invalidate)

    def cached(self, job_id: str) -> JobRecord | None:
        """The kept record of ``job_id`` without touching the database; None on a miss."""
        return self.cache.lookup(job_id)

    def get(self, job_id: str) -> JobRecord | None:
        hit = self.cache.lookup(job_id)
        if hit is not None:
            return hit
        ticket = self.cache.begin(job_id)
        record = super().get(job_id)
        self.cache.fill(job_id, ticket, record)
        return record

    # -- this replica's writes: dropped once committed (read-your-writes) -------
    def insert_or_existing(self, record: JobRecord) -> JobRecord:
        try:
            return super().insert_or_existing(record)
        finally:
            self.cache.invalidate(record.id)

    def save(self, record: JobRecord, durable: bool = True) -> None:
        try:
            super().save(record, durable)
        finally:
            self.cache.invalidate(record.id)

    def save_leased(self, record: JobRecord, token: int) -> bool:
        try:
            return super().save_leased(record, token)
        finally:
            self.cache.invalidate(record.id)

    def claim(self, worker: str, lease_s: float, max_attempts: int) -> Claim | None:
        claim = super().claim(worker, lease_s, max_attempts)
        if claim is not None:
            self.cache.invalidate(claim.record.id)
        return claim

    def request_cancel(self, job_id: str) -> JobRecord | None:
        try:
            return super().request_cancel(job_id)
        finally:
            self.cache.invalidate(job_id)


__all__ = ["MAX_AGE_S", "MAX_ENTRIES", "CachingPostgresJobStore", "RecordCache"]
