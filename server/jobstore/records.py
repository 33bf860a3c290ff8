"""A job as the domain layer sees it: frozen plain data, no protobuf.

:class:`JobRecord` is what :class:`~secateur.server.api.jobs.JobManager` hands
out and what a :class:`~secateur.server.jobstore.interface.JobStore` keeps; the servicer
turns it into a ``secateur.v1.Job`` (``server/jobstore/jobs_pb.py``). A record is
never changed in place: each change is a new record (:meth:`JobRecord.evolve`),
so a watcher can tell a change by identity.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from secateur.server.errors import ServiceError
from secateur.server.pipeline.job_request import JobRequest


class JobState(enum.Enum):
    """Where a job is in its life; the names are the contract's without ``STATE_``."""

    #: Not a job: the answer to a ``validate_only`` request.
    UNSPECIFIED = "UNSPECIFIED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class JobError:
    """Why a job failed or was cancelled: a status code, a message, field violations."""

    code: grpc.StatusCode
    message: str
    violations: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, err: ServiceError) -> JobError:
        return cls(err.code, err.message, tuple(err.violations))


@dataclass(frozen=True)
class JobRecord:
    """One job.

    Attributes:
        id: the ``{id}`` of ``jobs/{id}``.
        spec: the request as the client sent it (a serialized
            ``secateur.v1.JobSpec``), kept verbatim: GetJob shows what was
            sent, and a worker process rebuilds its ``JobRequest`` from it.
        stage: a ``pipeline.STAGES`` name while RUNNING, else "".
        progress: overall, in [0, 1].
        result: the pipeline's report once the job has one (success, or a
            failed accuracy gate).
        create_ns, start_ns, end_ns, update_ns: wall-clock times in ns since
            the epoch (0: not yet).
        attempts: how many times the job was started.
        worker: the worker that runs it (or ran it last); "" before one claims it.
        lease_expires: when that worker's lease ends unless renewed, in
            seconds since the epoch (0: no lease; the SQLite store has none).
        tenant: the tenant whose token created the job ("" without tenants);
            no other tenant sees it (server/api/tenants.py).
    """

    id: str
    spec: bytes
    state: JobState
    request_id: str = ""
    stage: str = ""
    progress: float = 0.0
    message: str = ""
    error: JobError | None = None
    result: Mapping[str, Any] | None = None
    create_ns: int = 0
    start_ns: int = 0
    end_ns: int = 0
    update_ns: int = 0
    attempts: int = 0
    worker: str = ""
    lease_expires: float = 0.0
    tenant: str = ""

    @property
    def name(self) -> str:
        return f"jobs/{self.id}"

    def evolve(self, **changes: Any) -> JobRecord:
        """A copy with ``changes`` and ``update_ns`` set to now."""
        return dataclasses.replace(self, **{"update_ns": now_ns(), **changes})


@dataclass(frozen=True)
class Submission:
    """A validated CreateJob: the request, the spec as sent, and how to treat it."""

    request: JobRequest
    spec: bytes
    request_id: str = ""
    validate_only: bool = False


def now_ns() -> int:
    return time.time_ns()
