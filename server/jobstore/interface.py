"""What the rest of the server needs of a job store, whichever store it is.

:class:`JobStore` keeps records; :class:`QueueStore` also leases queued jobs
to workers, with fencing tokens. :class:`StoreOpenError` is raised by every
store that cannot be opened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from secateur.server.jobstore.records import JobRecord, JobState


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
        self,
        state: JobState | None,
        after: tuple[int, str] | None,
        limit: int,
        tenant: str | None = None,
    ) -> tuple[list[JobRecord], tuple[int, str] | None]:
        """Jobs newest first by ``(create_ns, id)`` strictly after ``after``, of ``state``
        (None: any) and of ``tenant`` (None: any); and the key of the page's last job
        when more follow."""
        ...

    def all(self) -> list[JobRecord]:
        """Every job, oldest first."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Claim:
    """A job a worker claimed: its record (now RUNNING), the lease's fencing token, and
    the version an earlier attempt was fenced to publish ("": none; see pipeline/publish.py).

    ``ending``: the job is not to run again (its attempts are spent, or its cancel is
    pending): the claimer settles the publication its fence recorded in ``publish_uri``
    if any (workers/lifecycle.settled), removes its checkpoints and writes this end
    (or SUCCEEDED). The store never ends such a job itself: only a claimer can reach
    the job's storage."""

    record: JobRecord
    token: int
    publish_uri: str = ""
    ending: JobRecord | None = None


@dataclass(frozen=True)
class Lease:
    """A renewal's answer: still held?, cancel requested?, expiry (s since the epoch)."""

    held: bool
    cancel_requested: bool
    expires: float


class QueueStore(JobStore, Protocol):
    """A store that also leases jobs to workers (PostgreSQL; see server/jobstore/postgres.py).

    A worker ``claim`` s a job, ``renew`` s its lease while it runs and writes
    with ``save_leased``; each claim bumps the job's fencing token, and a write
    or ``fence`` naming a superseded token is refused, so a worker that lost
    its lease can neither overwrite nor publish. A cancel requested of a running
    job is kept in the store (it outlives the worker and, for SQLite, the process).
    """

    def claim(self, worker: str, lease_s: float, max_attempts: int) -> Claim | None: ...

    def renew(self, job_id: str, token: int, lease_s: float) -> Lease: ...

    def save_leased(self, record: JobRecord, token: int) -> bool: ...

    def fence(self, job_id: str, token: int, min_remaining_s: float, publish_uri: str = "") -> bool:
        """May the holder of ``token`` publish now? A yes records ``publish_uri``
        (durably, in the same write) for the job's later attempts."""
        ...

    def request_cancel(self, job_id: str) -> JobRecord | None: ...

    def live_leases(self, job_ids: list[str]) -> dict[str, int]: ...

    def counts(self) -> dict[JobState, int]: ...

    def subscribe(self, callback: Callable[[str | None], None]) -> Callable[[], None]: ...
