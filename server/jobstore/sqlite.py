"""Durable jobs: the :class:`JobStore` interface and its embedded SQLite store.

A store keeps :class:`~secateur.server.records.JobRecord` s keyed by id.
:class:`SqliteJobStore` (the default, under the state directory) keeps each
job as one row: indexed columns for lookups (id, request_id, state, create
time), the whole ``secateur.v1.Job`` message as bytes and, since issue 9, the
result's report as JSON beside it (a ``Job`` carries the report only as far
as the contract shows it; rows without one are read from the message).
Writes are transactions (WAL journal), so a crash loses at most the update in
flight, never a job. The store keeps every job in memory too: reads are
served from there (the service is the only writer), which keeps ``GetJob``
fast.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from secateur.server import jobs_pb
from secateur.server.records import JobError, JobRecord, JobState, now_ns
from secateur.v1 import pruning_pb2

Job = pruning_pb2.Job
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
# when their job is marked FAILED (see JobStore._load).
QUARANTINE_SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT PRIMARY KEY,
    data BLOB,
    reason TEXT NOT NULL,
    time REAL NOT NULL
);
"""
QUARANTINE_MESSAGE = (
    "the server could not read this job's stored record (corrupt); the job was marked "
    "FAILED and its record kept aside: submit it again"
)


def quarantined(job_id: str, request_id: str | None, create_ns: int, end_ns: int = 0) -> JobRecord:
    """The FAILED (DATA_LOSS) record that stands for a row that does not decode."""
    return JobRecord(
        id=job_id,
        spec=b"",
        state=JobState.FAILED,
        request_id=request_id or "",
        message=QUARANTINE_MESSAGE,
        error=JobError(grpc.StatusCode.DATA_LOSS, QUARANTINE_MESSAGE),
        create_ns=create_ns,
        end_ns=end_ns,
        update_ns=end_ns,
    )


class StoreOpenError(Exception):
    """The job database cannot be opened; the message names the file and what to do."""


class JobStore(Protocol):
    """What the job manager needs of a store; records keyed by ``record.id``.

    ``save`` and ``insert`` change what ``get`` returns only once the write
    is durable (``durable=False``: memory only, for progress ticks), so a
    failed write leaves the store as it was.
    """

    def insert(self, record: JobRecord) -> None: ...

    def save(self, record: JobRecord, durable: bool = True) -> None: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def by_request_id(self, request_id: str) -> JobRecord | None: ...

    def page(
        self, state: JobState | None, after: tuple[int, str] | None, limit: int
    ) -> tuple[list[JobRecord], tuple[int, str] | None]:
        """Jobs newest first by ``(create_ns, id)`` strictly after ``after``, of ``state``
        (None: any); and the key of the page's last job when more follow."""
        ...

    def all(self) -> list[JobRecord]:
        """Every job, oldest first."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Claim:
    """A job a worker claimed: its record (now RUNNING) and the lease's fencing token."""

    record: JobRecord
    token: int


@dataclass(frozen=True)
class Lease:
    """A renewal's answer: still held?, cancel requested?, expiry (s since the epoch)."""

    held: bool
    cancel_requested: bool
    expires: float


class QueueStore(JobStore, Protocol):
    """A store that also leases jobs to workers (PostgreSQL; see server/pgstore.py).

    A worker ``claim`` s a job, ``renew`` s its lease while it runs and writes
    with ``save_leased``; each claim bumps the job's fencing token, and a write
    or ``fence`` naming a superseded token is refused, so a worker that lost
    its lease can neither overwrite nor publish.
    """

    def claim(self, worker: str, lease_s: float, max_attempts: int) -> Claim | None: ...

    def renew(self, job_id: str, token: int, lease_s: float) -> Lease: ...

    def save_leased(self, record: JobRecord, token: int) -> bool: ...

    def fence(self, job_id: str, token: int, min_remaining_s: float) -> bool: ...

    def request_cancel(self, job_id: str) -> JobRecord | None: ...

    def live_leases(self, job_ids: list[str]) -> dict[str, int]: ...

    def counts(self) -> dict[JobState, int]: ...

    def subscribe(self, callback: Callable[[str | None], None]) -> Callable[[], None]: ...


def open_store(url: str, state_dir: str, cache: bool = True) -> JobStore:
    """The store a ``--store`` URL names.

    ``""`` or ``sqlite:///<state_dir>/jobs.sqlite`` is the embedded default
    (:class:`SqliteJobStore`); ``sqlite:///ABS/DIR/jobs.sqlite`` keeps it in
    another folder; ``postgresql://USER[:PASS]@HOST:PORT/DB`` (or
    ``postgres://``) is the shared :class:`~secateur.server.pgstore.PostgresJobStore`,
    with a serving replica's record cache unless ``cache`` is False (workers:
    see server/pgcache.py).

    Raises:
        StoreOpenError: an unknown scheme, a SQLite path that is not an absolute
            ``.../jobs.sqlite``, or a database that cannot be opened.
    """
    if not url:
        return SqliteJobStore(state_dir)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        path = url[len("sqlite://") :]
        if not path.startswith("/") or os.path.basename(path) != "jobs.sqlite":
            raise StoreOpenError(
                "a SQLite store URL must name an absolute path to a file called jobs.sqlite, "
                f"as sqlite:///var/lib/secateur/jobs.sqlite. Received: {url}"
            )
        return SqliteJobStore(os.path.dirname(path))
    if scheme in ("postgresql", "postgres"):
        from secateur.server.pgcache import CachingPostgresJobStore
        from secateur.server.pgstore import PostgresJobStore

        return CachingPostgresJobStore(url) if cache else PostgresJobStore(url)
    raise StoreOpenError(
        "the store URL must start with sqlite:/// or postgresql:// "
        "(postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE). "
        f"Received: {_without_password(url)}"
    )


def _without_password(url: str) -> str:
    """``url`` with any password replaced by ``***`` (it is echoed in errors)."""
    head, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{head}://{creds.split(':', 1)[0]}:***@{host}"


class SqliteJobStore:
    """A :class:`JobStore` in ``<state_dir>/jobs.sqlite`` (see module docstring)."""

    def __init__(self, state_dir: str) -> None:
        """Open (or create) ``<state_dir>/jobs.sqlite`` and load every job.

        Raises:
            StoreOpenError: the state directory cannot be created, or the database
                is not a readable, writable SQLite job database.
        """
        self.path = os.path.join(state_dir, "jobs.sqlite")
        self._db = _connect(state_dir, self.path)
        self._lock = threading.Lock()
        self._jobs: dict[str, JobRecord] = {}
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
            "SELECT id, request_id, create_time, data, report FROM jobs ORDER BY create_time DESC"
        ).fetchall()
        for job_id, request_id, create_time, data, report in rows:
            job = _decode(job_id, data, report)
            if job is None:
                job = self._quarantine(job_id, request_id, create_time, data)
            self._jobs[job_id] = job
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
            "UPDATE jobs SET state = ?, data = ?, report = ? WHERE id = ?", (*_row(job), job_id)
        )
        return job

    def insert(self, record: JobRecord) -> None:
        with self._lock:
            state, data, report = _row(record)
            self._db.execute(
                "INSERT INTO jobs (id, request_id, state, create_time, data, report) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, record.request_id or None, state, record.create_ns / 1e9, data, report),
            )
            self._jobs[record.id] = record
            self._order.insert(0, record.id)
            if record.request_id:
                self._by_request[record.request_id] = record.id

    def save(self, record: JobRecord, durable: bool = True) -> None:
        """Replace a job; ``durable=False`` only updates memory (progress ticks)."""
        with self._lock:
            if durable:  # the database first: a failed write leaves memory as it was
                self._db.execute(
                    "UPDATE jobs SET state = ?, data = ?, report = ? WHERE id = ?",
                    (*_row(record), record.id),
                )
            self._jobs[record.id] = record

    def get(self, job_id: str) -> JobRecord | None:
        return self._jobs.get(job_id)

    def by_request_id(self, request_id: str) -> JobRecord | None:
        job_id = self._by_request.get(request_id)
        return self._jobs.get(job_id) if job_id else None

    def page(
        self, state: JobState | None, after: tuple[int, str] | None, limit: int
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
            if (state is None or job.state == state) and (after is None or key < after)
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


def _row(record: JobRecord) -> tuple[int, bytes, str | None]:
    """The stored columns of a record: state number, ``Job`` bytes, report JSON."""
    job = jobs_pb.to_pb(record)
    report = json.dumps(record.result, default=_jsonable) if record.result is not None else None
    return job.state, job.SerializeToString(), report


def _jsonable(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def _decode(job_id: object, data: object, report: object) -> JobRecord | None:
    """The row's record, or None when its bytes are not a Job (or not this row's)."""
    if not isinstance(data, bytes):
        return None
    try:
        job = Job.FromString(data)
        if job.name != f"jobs/{job_id}":
            return None
        result = json.loads(report) if isinstance(report, str) else None
        return jobs_pb.from_pb(job, result)
    except Exception:  # noqa: BLE001 - any decoding failure quarantines the row
        return None
