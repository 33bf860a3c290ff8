"""A job's life as the service records it: recovery after a restart, its end,
and the settling of a publication an unsuccessful end leaves (:func:`settled`).

Used by the job manager (``api/jobs.py``) and the worker loop
(``workers/loop.py``): what a job left RUNNING by a dead server becomes, the
INFO line of a job's end, and the ``outcome`` label its end counts under in
``secateur_jobs_completed_total`` (see ``metrics.OUTCOMES``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grpc

from secateur.server.errors import ServiceError
from secateur.server.jobstore.records import JobError, JobRecord, JobState, now_ns
from secateur.server.pipeline.publish import settle
from secateur.server.storage import Storage

log = logging.getLogger("secateur.server")

#: The metrics outcome of each terminal state (a failed accuracy gate aside).
OUTCOMES = {
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}


def outcome_label(record: JobRecord | None) -> str:
    """The metrics outcome of an ended job, read from its state and its result's outcome."""
    if record is None:
        return "failed"
    result = record.result or {}
    if record.state == JobState.FAILED and result.get("outcome") == "gate_failed":
        return "gate_failed"
    return OUTCOMES.get(record.state, "failed")


def recovered(record: JobRecord, max_attempts: int) -> JobRecord:
    """A job a dead server left RUNNING: queued again, or failed after ``max_attempts``."""
    if record.attempts >= max_attempts:
        err = ServiceError(
            grpc.StatusCode.ABORTED,
            f"the server stopped {record.attempts} times while this job was running; giving up",
        )
        log.info("job %s recovered after a restart: failed, %s", record.id, err.message)
        return record.evolve(
            state=JobState.FAILED, end_ns=now_ns(), error=JobError.of(err), message=err.message
        )
    log.info(
        "job %s recovered after a restart: queued again (%d attempt(s) so far)",
        record.id, record.attempts,
    )  # fmt: skip
    return record.evolve(
        state=JobState.QUEUED,
        stage="",
        progress=0.0,
        message="the server restarted during this job; it will run again",
    )


def ended(
    record: JobRecord,
    state: JobState,
    error: ServiceError | None,
    report: dict[str, Any] | None,
    now: int,
) -> JobRecord:
    """``record`` at its end: state, times, error and result; the message says why."""
    changes: dict[str, Any] = {"state": state, "end_ns": now, "update_ns": now}
    if state == JobState.SUCCEEDED:
        changes |= {"progress": 1.0, "stage": ""}
    message = record.message
    if error is not None:
        changes["error"] = JobError.of(error)
        message = error.message
    if report is not None:
        changes["result"] = report
        message = report.get("decision") or message
    return record.evolve(message=message, **changes)


def settled(final: JobRecord, uri: str, storage: Storage) -> JobRecord:
    """``final`` (an end other than SUCCEEDED of a job whose fence recorded ``uri``)
    once its publication is settled (storage calls only, no TensorFlow):

    - ``uri`` is the job's complete version: the work was done, so the job ends
      SUCCEEDED from the report in it;
    - it is the job's but incomplete (a ``gs://`` publish killed between its first
      and its last copy): it is deleted and ``final`` says so;
    - anything else (nothing there, another job's version, a complete one changed
      since) is left alone and ``final`` stays as it is.

    Either way the staging the job's killed publishes left is removed. A storage
    error leaves ``final`` as it is, its message saying what could not be checked.
    """
    try:
        found = settle(storage, uri, final.id)
    except Exception as exc:  # noqa: BLE001 - the job ends anyway; the message says why
        log.warning("job %s: settling its publication at %s failed (%s)", final.id, uri, exc)
        return _noted(final, f"its publication at {uri} could not be checked ({exc})")
    if found.staging:
        log.info("job %s: removed the staging its publish left: %s", final.id, found.staging)
    if found.report is not None:
        log.info("job %s: its version %s is complete; it ends SUCCEEDED", final.id, uri)
        return ended(final.evolve(error=None), JobState.SUCCEEDED, None, found.report, now_ns())
    if found.removed:
        log.info("job %s: removed its half-published version %s", final.id, uri)
        return _noted(
            final, f"the version it was publishing ({uri}) was incomplete and was removed"
        )
    return final


def _noted(record: JobRecord, note: str) -> JobRecord:
    """``record`` with ``note`` added to its message and its error's."""
    error = record.error
    if error is not None:
        error = dataclasses.replace(error, message=f"{error.message}; {note}")
    return record.evolve(message=f"{record.message}; {note}", error=error)
