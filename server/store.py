"""Durable jobs: an embedded SQLite store under the state directory.

Each job is one row: indexed columns for lookups (id, request_id, state,
create time) and the whole ``Job`` message as bytes. Writes are
transactions (WAL journal), so a crash loses at most the update in flight,
never a job. The store keeps every job in memory too: reads are served from
there (the service is the only writer), which keeps ``GetJob`` fast.
"""

from __future__ import annotations

import os
import sqlite3
import threading

from secateur.v1 import pruning_pb2

Job = pruning_pb2.Job

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


class JobStore:
    """Jobs keyed by id (the ``{id}`` of ``jobs/{id}``)."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "jobs.sqlite")
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._by_request: dict[str, str] = {}
        self._order: list[str] = []  # newest first
        for row in self._db.execute(
            "SELECT id, request_id, data FROM jobs ORDER BY create_time DESC"
        ):
            job = Job.FromString(row[2])
            self._jobs[row[0]] = job
            self._order.append(row[0])
            if row[1]:
                self._by_request[row[1]] = row[0]

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
            self._jobs[job_id] = job
            if durable:
                self._db.execute(
                    "UPDATE jobs SET state = ?, data = ? WHERE id = ?",
                    (job.state, job.SerializeToString(), job_id),
                )

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def by_request_id(self, request_id: str) -> Job | None:
        job_id = self._by_request.get(request_id)
        return self._jobs.get(job_id) if job_id else None

    def page(self, state: int, offset: int, limit: int) -> tuple[list[Job], int | None]:
        """Jobs newest first, optionally of one state; returns the next offset."""
        with self._lock:
            ids = (
                self._order
                if not state
                else [i for i in self._order if self._jobs[i].state == state]
            )
            chunk = ids[offset : offset + limit]
            more = offset + limit < len(ids)
            return [self._jobs[i] for i in chunk], (offset + limit if more else None)

    def all(self) -> list[Job]:
        with self._lock:
            return [self._jobs[i] for i in reversed(self._order)]  # oldest first

    def close(self) -> None:
        with self._lock:
            self._db.close()
