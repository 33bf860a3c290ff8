"""A job record as a store keeps it, and back: the columns every store writes.

Both stores (SQLite and PostgreSQL) keep the whole ``secateur.v1.Job``
message as bytes and the result's report as JSON beside it. A row whose bytes
do not decode is not fatal: its job becomes :func:`quarantined` (FAILED,
DATA_LOSS) and the store keeps the original bytes for a post-mortem.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from secateur.server.jobstore import jobs_pb
from secateur.server.jobstore.records import JobError, JobRecord, JobState, now_ns
from secateur.v1 import pruning_pb2

Job = pruning_pb2.Job

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


def encode_row(record: JobRecord) -> tuple[int, bytes, str | None]:
    """The stored columns of a record: state number, ``Job`` bytes, report JSON."""
    job = jobs_pb.to_pb(record)
    report = json.dumps(record.result, default=_jsonable) if record.result is not None else None
    return job.state, job.SerializeToString(), report


def _jsonable(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def decode_row(job_id: object, data: object, report: object) -> JobRecord | None:
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


def taken(record: JobRecord, worker: str) -> JobRecord:
    """A job as a worker's claim starts it: RUNNING, one more attempt, no result yet."""
    return record.evolve(
        state=JobState.RUNNING,
        attempts=record.attempts + 1,
        start_ns=now_ns(),
        end_ns=0,
        stage="",
        progress=0.0,
        message=f"running on worker {worker}",
        error=None,
        worker=worker,
    )


def given_up(record: JobRecord, worker: str, cancel_requested: bool) -> JobRecord:
    """The end of a reclaimed job that is not to run again."""
    if cancel_requested:
        error = JobError(grpc.StatusCode.CANCELLED, f"cancelled (its worker {worker} stopped)")
        state = JobState.CANCELLED
    else:
        message = f"the job's worker stopped {record.attempts} times (last: {worker}); giving up"
        error = JobError(grpc.StatusCode.ABORTED, message)
        state = JobState.FAILED
    return record.evolve(
        state=state, end_ns=now_ns(), error=error, message=error.message, lease_expires=0.0
    )
