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
"""

from __future__ import annotations

import heapq
import logging
import os
import sqlite3
import threading
import time

from secateur.server.jobstore.codec import decode_row, encode_row, quarantined
from secateur.server.jobstore.interface import StoreOpenError
from secateur.server.jobstore.records import JobRecord, JobState, now_ns

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
            job = decode_row(job_id, data, report)
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
            "UPDATE jobs SET state = ?, data = ?, report = ? WHERE id = ?",
            (*encode_row(job), job_id),
        )
        return job

    def insert(self, record: JobRecord) -> None:
        with self._lock:
            state, data, report = encode_row(record)
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
                    (*encode_row(record), record.id),
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
