"""The embedded job store: every job in one SQLite file under the state directory.

A store keeps :class:`~secateur.server.jobstore.records.JobRecord` s keyed by id.
:class:`SqliteJobStore` (the default, under the state directory) keeps each
job as one row: indexed columns for lookups (id, request_id, state, create
time), the whole ``secateur.v1.Job`` message as bytes and, since issue 9, the
result's report as JSON beside it (a ``Job`` carries the report only as far
as the contract shows it; rows without one are read from the message).
Writes are transactions (WAL journal), so a crash loses at most the update in
flight, never a job. The store keeps every job in memory too: reads are
served from there (the service is the only writer), which keeps ``GetJob``
fast.

It is also a :class:`~secateur.server.jobstore.interface.QueueStore`, so the
embedded server runs its jobs through the same
:class:`~secateur.server.workers.loop.WorkerLoop` (claim, lease, fence,
conclude) as the PostgreSQL store's workers. Leases live in memory only: one
process owns the file, and its leases die with it; a job it left RUNNING has
no lease after a restart (the job manager recovers it before claiming). What
must outlive the process is in the file: a requested cancel
(``cancel_requested``: a job handed back or recovered with one ends CANCELLED,
never runs again) and the version a job's fence let it publish (``publish_uri``:
its next attempt looks there first, server/pipeline/publish.py).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from secateur.server.jobstore.codec import decode_row, encode_row, given_up, quarantined, taken
from secateur.server.jobstore.interface import Claim, Lease, StoreOpenError
from secateur.server.jobstore.records import JobError, JobRecord, JobState, now_ns

log = logging.getLogger("secateur.server")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    state INTEGER NOT NULL,
    create_time REAL NOT NULL,
    data BLOB NOT NULL,
    report TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (create_time DESC);
"""
# The original bytes of rows that could not be decoded, kept for a post-mortem
# when their job is marked FAILED (see SqliteJobStore._load).
QUARANTINE_SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT PRIMARY KEY,
    data BLOB,
    reason TEXT NOT NULL,
    time REAL NOT NULL
);
"""


@dataclass
class _Lease:
    """A claim held in memory: which worker, its fencing token, expiry (s since the epoch)."""

    worker: str
    token: int
    expires: float


class SqliteJobStore:
    """A :class:`~.interface.JobStore` in ``<state_dir>/jobs.sqlite`` (see module docstring)."""

    def __init__(self, state_dir: str) -> None:
        """Open (or create) ``<state_dir>/jobs.sqlite`` and load every job.

        Raises:
            StoreOpenError: the state directory cannot be created, or the database
                is not a readable, writable SQLite job database.
        """
        self.path = os.path.join(state_dir, "jobs.sqlite")
        self._db = _connect(state_dir, self.path)
        self._lock = threading.RLock()  # the queue methods save() while holding it
        self._jobs: dict[str, JobRecord] = {}
        self._active: set[str] = set()  # QUEUED or RUNNING: what a claim looks at
        self._leases: dict[str, _Lease] = {}
        self._cancels: set[str] = set()  # cancel requested while running (also in the file)
        self._publish: dict[str, str] = {}  # the version each job was fenced to publish
        self._subscribers: list[Callable[[str | None], None]] = []
        self._by_request: dict[str, str] = {}
        self._order: list[str] = []  # newest first
        try:
            self._load()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreOpenError(_open_problem(self.path, exc)) from exc

    def _load(self) -> None:
        """Jobs into memory; a row that does not decode is quarantined, not fatal."""
        rows = self._db.execute(
            "SELECT id, request_id, create_time, data, report, cancel_requested, publish_uri "
            "FROM jobs ORDER BY create_time DESC"
        ).fetchall()
        for job_id, request_id, create_time, data, report, cancel, uri in rows:
            if cancel:
                self._cancels.add(job_id)
            if uri:
                self._publish[job_id] = uri
            job = decode_row(job_id, data, report)
            if job is None:
                job = self._quarantine(job_id, request_id, create_time, data)
            self._keep(job)
            self._order.append(job_id)
            if request_id:
                self._by_request[request_id] = job_id

    def _quarantine(
        self, job_id: str, request_id: str | None, create: float, data: object
    ) -> JobRecord:
        """Keep an undecodable row's bytes aside and mark its job FAILED (DATA_LOSS)."""
        log.error(
            "job %s: its row in %s does not decode as a secateur.v1.Job; marked FAILED, "
            "the original bytes are kept in the quarantine table",
            job_id,
            self.path,
        )
        create_ns = int(create * 1e9) if isinstance(create, int | float) else 0
        job = quarantined(job_id, request_id, create_ns, end_ns=now_ns())
        self._db.execute(
            "INSERT OR IGNORE INTO quarantine (id, data, reason, time) VALUES (?, ?, ?, ?)",
            (job_id, data, "does not decode as secateur.v1.Job", time.time()),
        )
        self._db.execute(
            "UPDATE jobs SET state = ?, data = ?, report = ? WHERE id = ?",
            (*encode_row(job), job_id),
        )
        return job

    def insert(self, record: JobRecord) -> None:
        with self._lock:
            state, data, report = encode_row(record)
            self._db.execute(
                "INSERT INTO jobs (id, request_id, state, create_time, data, report, tenant) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.request_id or None,
                    state,
                    record.create_ns / 1e9,
                    data,
                    report,
                    record.tenant,
                ),
            )
            self._keep(record)
            self._order.insert(0, record.id)
            if record.request_id:
                self._by_request[record.request_id] = record.id
        self._notify(record.id)

    def save(self, record: JobRecord, durable: bool = True) -> None:
        """Replace a job; ``durable=False`` only updates memory (progress ticks)."""
        with self._lock:
            if durable:  # the database first: a failed write leaves memory as it was
                self._db.execute(
                    "UPDATE jobs SET state = ?, data = ?, report = ? WHERE id = ?",
                    (*encode_row(record), record.id),
                )
            self._keep(record)
        self._notify(record.id)

    def _keep(self, record: JobRecord) -> None:
        self._jobs[record.id] = record
        if record.state in (JobState.QUEUED, JobState.RUNNING):
            self._active.add(record.id)
        else:
            self._active.discard(record.id)

    def get(self, job_id: str) -> JobRecord | None:
        return self._jobs.get(job_id)

    def by_request_id(self, request_id: str) -> JobRecord | None:
        job_id = self._by_request.get(request_id)
        return self._jobs.get(job_id) if job_id else None

    def page(
        self,
        state: JobState | None,
        after: tuple[int, str] | None,
        limit: int,
        tenant: str | None = None,
    ) -> tuple[list[JobRecord], tuple[int, str] | None]:
        """Jobs newest first by ``(create time in ns, id)``, optionally of one state.

        Only jobs ordered strictly after the key ``after`` are returned, so a
        job created between two pages never shifts the next one. Also returns
        the key of the page's last job when more follow, else None.
        """
        with self._lock:
            keyed = [((j.create_ns, i), j) for i, j in self._jobs.items()]
        keyed = [
            (key, job)
            for key, job in keyed
            if (state is None or job.state == state)
            and (after is None or key < after)
            and (tenant is None or job.tenant == tenant)
        ]
        chunk = heapq.nlargest(limit + 1, keyed, key=lambda kj: kj[0])
        more = len(chunk) > limit
        return [job for _, job in chunk[:limit]], (chunk[limit - 1][0] if more else None)

    def all(self) -> list[JobRecord]:
        with self._lock:
            return [self._jobs[i] for i in reversed(self._order)]  # oldest first

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- QueueStore (see the module docstring) --------------------------------
    def claim(self, worker: str, lease_s: float, max_attempts: int) -> Claim | None:
        """The oldest claimable job, now RUNNING on ``worker`` under a new token.

        Claimable: QUEUED, or RUNNING with its lease expired or gone. A reclaimed
        job that already ran ``max_attempts`` times fails (ABORTED), one whose
        cancel was requested is CANCELLED: both are handed over with that end
        (Claim.ending), which the claimer writes once it settled the job's
        publication and removed its checkpoints. None when nothing is claimable.
        """
        with self._lock:
            now = time.time()
            for job in sorted((self._jobs[i] for i in self._active), key=_age):
                lease = self._leases.get(job.id)
                cancel = job.id in self._cancels  # QUEUED too: handed back or recovered
                if job.state is JobState.RUNNING and lease is not None and lease.expires >= now:
                    continue  # held
                stale = lease.worker if lease else job.worker
                ending = None
                if cancel or (job.state is JobState.RUNNING and job.attempts >= max_attempts):
                    self._leases.pop(job.id, None)
                    ending = given_up(job, stale, cancel)  # the claimer ends it (Claim.ending)
                running = taken(job, worker)
                # The token is the attempt: it grows with every claim, across restarts too.
                lease = _Lease(worker, running.attempts, now + lease_s)
                running = dataclasses.replace(running, lease_expires=lease.expires)
                self.save(running)  # raises, claiming nothing, when the write fails
                self._leases[job.id] = lease
                return Claim(running, lease.token, self._publish.get(job.id, ""), ending)
            return None

    def renew(self, job_id: str, token: int, lease_s: float) -> Lease:
        """Extend a held lease by ``lease_s`` from now; ``held=False`` once lost."""
        with self._lock:
            lease = self._held(job_id, token)
            if lease is None:
                return Lease(held=False, cancel_requested=False, expires=0.0)
            lease.expires = time.time() + lease_s
            cancel = job_id in self._cancels
            return Lease(held=True, cancel_requested=cancel, expires=lease.expires)

    def save_leased(self, record: JobRecord, token: int) -> bool:
        """Write the record of a job ``token`` still holds; False, writing nothing, if not."""
        with self._lock:
            lease = self._held(record.id, token)
            if lease is None:
                return False
            if record.state is JobState.QUEUED and record.id in self._cancels:  # a hand-back
                record = given_up(record, lease.worker, cancel_requested=True)
            if record.state is not JobState.RUNNING:  # ended or handed back: no lease
                record = dataclasses.replace(record, lease_expires=0.0)
            self.save(record)
            if record.state is not JobState.RUNNING:
                self._leases.pop(record.id, None)
            return True

    def fence(self, job_id: str, token: int, min_remaining_s: float, publish_uri: str = "") -> bool:
        """May the holder of ``token`` publish (to ``publish_uri``, recorded) now?
        (as PostgresJobStore.fence)."""
        with self._lock:
            lease = self._held(job_id, token)
            now = time.time()
            if lease is None or job_id in self._cancels or lease.expires <= now + min_remaining_s:
                return False
            if publish_uri:  # durable before the answer: the publish may follow at once
                self._db.execute(
                    "UPDATE jobs SET publish_uri = ? WHERE id = ?", (publish_uri, job_id)
                )
                self._publish[job_id] = publish_uri
            lease.expires = max(lease.expires, now + 2 * min_remaining_s)
            return True

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """QUEUED ends CANCELLED at once; RUNNING gets its cancel flag, in the file
        too (its worker sees it at the next renewal; a hand-back or a restart ends
        the job CANCELLED), and so does a QUEUED job whose fence recorded a version
        (the next claim hands it over to end it, that version settled: Claim.ending);
        an ended job is left as it is."""
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                return None
            if record.state is JobState.QUEUED and not self._publish.get(job_id):
                error = JobError(grpc.StatusCode.CANCELLED, "cancelled while queued")
                record = record.evolve(
                    state=JobState.CANCELLED, end_ns=now_ns(), error=error, message=error.message
                )
                self.save(record)
            elif record.state in (JobState.QUEUED, JobState.RUNNING):
                self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                self._cancels.add(job_id)
            return record

    def live_leases(self, job_ids: list[str]) -> dict[str, int]:
        """The token of each of ``job_ids`` RUNNING under an unexpired lease."""
        with self._lock:
            now = time.time()
            return {
                i: lease.token
                for i in job_ids
                if (lease := self._leases.get(i)) is not None and lease.expires > now
            }

    def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, 0 for none)."""
        counts = dict.fromkeys(JobState, 0)
        with self._lock:
            for record in self._jobs.values():
                counts[record.state] += 1
        return counts

    def subscribe(self, callback: Callable[[str | None], None]) -> Callable[[], None]:
        """Call ``callback(job_id)`` after each write, from the writing thread."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def _held(self, job_id: str, token: int) -> _Lease | None:
        lease = self._leases.get(job_id)
        record = self._jobs.get(job_id)
        if lease is None or lease.token != token or record is None:
            return None
        return lease if record.state is JobState.RUNNING else None

    def _notify(self, job_id: str) -> None:
        for callback in list(self._subscribers):
            callback(job_id)


def _connect(state_dir: str, path: str) -> sqlite3.Connection:
    """The database, its journal mode and schema; StoreOpenError saying what to do."""
    try:
        os.makedirs(state_dir, exist_ok=True)
    except OSError as exc:
        raise StoreOpenError(
            f"cannot create the state directory {state_dir}: {exc.strerror or exc}; choose "
            "another state directory (--state-dir) or fix its permissions"
        ) from exc
    try:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreOpenError(_open_problem(path, exc)) from exc
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA + QUARANTINE_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        if "report" not in columns:  # a database from before issue 9
            db.execute("ALTER TABLE jobs ADD COLUMN report TEXT")
        if "tenant" not in columns:  # before issue 18: every job is the unnamed tenant's
            db.execute("ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")
        if "cancel_requested" not in columns:  # issue 18: cancels that outlive their worker
            db.execute("ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0")
        if "publish_uri" not in columns:  # issue 18: the version a job's fence recorded
            db.execute("ALTER TABLE jobs ADD COLUMN publish_uri TEXT NOT NULL DEFAULT ''")
    except sqlite3.Error as exc:
        db.close()
        raise StoreOpenError(_open_problem(path, exc)) from exc
    return db


def _open_problem(path: str, exc: sqlite3.Error) -> str:
    """One line: which file, what is wrong with it, and what to do."""
    text = str(exc)
    folder = os.path.dirname(path)
    unwritable = (os.path.isfile(path) and not os.access(path, os.W_OK)) or not os.access(
        folder, os.W_OK
    )  # a read-only mount says so even to root
    if "readonly" in text or "read-only" in text or unwritable:
        what = (
            "it is read-only; the server writes it and the files beside it: make it and "
            f"{folder} writable by this user (or mount the volume read-write)"
        )
    elif "not a database" in text or "malformed" in text or "no such" in text:
        what = (
            "it is not a Secateur job database or is corrupt; move it (and any "
            "jobs.sqlite-wal/-shm beside it) aside to start with no jobs, or restore it "
            "from a backup"
        )
    else:
        what = (
            "check that it is a readable and writable file, in a writable directory, "
            "and that no other program holds it"
        )
    return f"cannot open the job database {path} ({text}): {what}"


def _age(record: JobRecord) -> tuple[int, str]:
    return record.create_ns, record.id
