"""Durable jobs: an embedded SQLite store under the state directory.

Each job is one row: indexed columns for lookups (id, request_id, state,
create time) and the whole ``Job`` message as bytes. Writes are
transactions (WAL journal), so a crash loses at most the update in flight,
never a job. The store keeps every job in memory too: reads are served from
there (the service is the only writer), which keeps ``GetJob`` fast.
"""

from __future__ import annotations

import heapq
import logging
import os
import sqlite3
import threading
import time

from google.rpc import code_pb2, status_pb2

from secateur.v1 import pruning_pb2

Job = pruning_pb2.Job
log = logging.getLogger("secateur.server")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    state INTEGER NOT NULL,
    create_time REAL NOT NULL,
    data BLOB NOT NULL
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


class StoreOpenError(Exception):
    """The job database cannot be opened; the message names the file and what to do."""


class JobStore:
    """Jobs keyed by id (the ``{id}`` of ``jobs/{id}``)."""

    def __init__(self, state_dir: str) -> None:
        """Open (or create) ``<state_dir>/jobs.sqlite`` and load every job.

        Raises:
            StoreOpenError: the state directory cannot be created, or the database
                is not a readable, writable SQLite job database.
        """
        self.path = os.path.join(state_dir, "jobs.sqlite")
        self._db = _connect(state_dir, self.path)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
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
            "SELECT id, request_id, create_time, data FROM jobs ORDER BY create_time DESC"
        ).fetchall()
        for job_id, request_id, create_time, data in rows:
            job = _decode(job_id, data)
            if job is None:
                job = self._quarantine(job_id, request_id, create_time, data)
            self._jobs[job_id] = job
            self._order.append(job_id)
            if request_id:
                self._by_request[request_id] = job_id

    def _quarantine(self, job_id: str, request_id: str | None, create: float, data: object) -> Job:
        """Keep an undecodable row's bytes aside and mark its job FAILED (DATA_LOSS)."""
        log.error(
            "job %s: its row in %s does not decode as a secateur.v1.Job; marked FAILED, "
            "the original bytes are kept in the quarantine table",
            job_id,
            self.path,
        )
        job = Job(name=f"jobs/{job_id}", state=Job.STATE_FAILED, message=QUARANTINE_MESSAGE)
        job.request_id = request_id or ""
        if isinstance(create, int | float):
            job.create_time.FromNanoseconds(int(create * 1e9))
        job.end_time.GetCurrentTime()
        job.update_time.GetCurrentTime()
        job.error.CopyFrom(status_pb2.Status(code=code_pb2.DATA_LOSS, message=job.message))
        self._db.execute(
            "INSERT OR IGNORE INTO quarantine (id, data, reason, time) VALUES (?, ?, ?, ?)",
            (job_id, data, "does not decode as secateur.v1.Job", time.time()),
        )
        self._db.execute(
            "UPDATE jobs SET state = ?, data = ? WHERE id = ?",
            (job.state, job.SerializeToString(), job_id),
        )
        return job

    def insert(self, job_id: str, job: Job) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, request_id, state, create_time, data) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    job_id,
                    job.request_id or None,
                    job.state,
                    job.create_time.ToNanoseconds() / 1e9,
                    job.SerializeToString(),
                ),
            )
            self._jobs[job_id] = job
            self._order.insert(0, job_id)
            if job.request_id:
                self._by_request[job.request_id] = job_id

    def save(self, job_id: str, job: Job, durable: bool = True) -> None:
        """Replace a job; ``durable=False`` only updates memory (progress ticks)."""
        with self._lock:
            if durable:  # the database first: a failed write leaves memory as it was
                self._db.execute(
                    "UPDATE jobs SET state = ?, data = ? WHERE id = ?",
                    (job.state, job.SerializeToString(), job_id),
                )
            self._jobs[job_id] = job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def by_request_id(self, request_id: str) -> Job | None:
        job_id = self._by_request.get(request_id)
        return self._jobs.get(job_id) if job_id else None

    def page(
        self, state: int, after: tuple[int, str] | None, limit: int
    ) -> tuple[list[Job], tuple[int, str] | None]:
        """Jobs newest first by ``(create time in ns, id)``, optionally of one state.

        Only jobs ordered strictly after the key ``after`` are returned, so a
        job created between two pages never shifts the next one. Also returns
        the key of the page's last job when more follow, else None.
        """
        with self._lock:
            keyed = [((j.create_time.ToNanoseconds(), i), j) for i, j in self._jobs.items()]
        keyed = [
            (key, job)
            for key, job in keyed
            if (not state or job.state == state) and (after is None or key < after)
        ]
        chunk = heapq.nlargest(limit + 1, keyed, key=lambda kj: kj[0])
        more = len(chunk) > limit
        return [job for _, job in chunk[:limit]], (chunk[limit - 1][0] if more else None)

    def all(self) -> list[Job]:
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


def _decode(job_id: object, data: object) -> Job | None:
    """The row's Job, or None when its bytes are not one (or not this row's)."""
    if not isinstance(data, bytes):
        return None
    try:
        job = Job.FromString(data)
    except Exception:  # noqa: BLE001 - any decoding failure quarantines the row
        return None
    return job if job.name == f"jobs/{job_id}" else None
