"""``secateur.v1.Job`` <-> :class:`~secateur.server.jobstore.records.JobRecord`.

The job manager and the store speak records; these functions are the one
place a record becomes a message (every RPC answer) and a message becomes a
record (rows stored as ``Job`` bytes by the SQLite store).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from secateur.server.errors import ServiceError, to_status_proto
from secateur.server.jobstore.records import JobError, JobRecord, JobState, Submission
from secateur.server.pipeline import convert
from secateur.v1 import enums
from secateur.v1 import pruning_pb2 as pb

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def submission(request: pb.CreateJobRequest) -> Submission:
    """A CreateJob request, validated into the domain's terms.

    Raises:
        ServiceError: INVALID_ARGUMENT naming the offending field.
    """
    return Submission(
        request=convert.job_request(request.spec),
        spec=request.spec.SerializeToString(),
        request_id=request.request_id,
        validate_only=request.validate_only,
    )


def state_number(state: JobState) -> int:
    """The contract's ``Job.State`` number of ``state``."""
    if state is JobState.UNSPECIFIED:
        return 0
    return enums.from_short_name(pb.Job.State, state.value)


def state_filter(number: int) -> JobState | None:
    """A ListJobs ``state`` filter: None for all (0), else the state.

    Raises:
        ServiceError: INVALID_ARGUMENT for a number that is no ``Job.State``
            (proto3 enums accept any number on the wire).
    """
    if number == 0:
        return None
    try:
        return JobState(enums.short_name(pb.Job.State, number))
    except ValueError:
        names = ", ".join(pb.Job.State.keys())
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"state must be one of {names}. Received: {number}",
            [("state", "not a Job.State")],
        ) from None


def to_pb(record: JobRecord) -> pb.Job:
    """The ``Job`` message of a record."""
    job = pb.Job(
        name=record.name if record.id else "",
        spec=pb.JobSpec.FromString(record.spec),
        state=state_number(record.state),  # type: ignore[arg-type]
        stage=enums.stage_number(record.stage),  # type: ignore[arg-type]
        progress=record.progress,
        message=record.message,
        request_id=record.request_id,
        attempts=record.attempts,
        worker=record.worker,
        tenant=record.tenant,
    )
    if record.error is not None:
        job.error.CopyFrom(error_status(record.error))
    if record.result is not None:
        job.result.CopyFrom(convert.job_result(record.result))
    for field, ns in (
        ("create_time", record.create_ns),
        ("start_time", record.start_ns),
        ("end_time", record.end_ns),
        ("update_time", record.update_ns),
        ("lease_expire_time", round(record.lease_expires * 1e9)),
    ):
        if ns:
            getattr(job, field).FromNanoseconds(ns)
    return job


def from_pb(job: pb.Job, report: Mapping[str, Any] | None = None) -> JobRecord:
    """The record of a stored ``Job``; ``report`` is its result when stored beside it."""
    if report is None and job.HasField("result"):
        report = report_of(job.result)
    stage = enums.short_name(pb.Job.Stage, job.stage) if job.stage else ""
    return JobRecord(
        id=job.name.removeprefix("jobs/"),
        spec=job.spec.SerializeToString(),
        state=JobState(enums.short_name(pb.Job.State, job.state) if job.state else "UNSPECIFIED"),
        request_id=job.request_id,
        stage=stage,
        progress=job.progress,
        message=job.message,
        error=error_of(job.error) if job.HasField("error") else None,
        result=report,
        create_ns=job.create_time.ToNanoseconds(),
        start_ns=job.start_time.ToNanoseconds(),
        end_ns=job.end_time.ToNanoseconds(),
        update_ns=job.update_time.ToNanoseconds(),
        attempts=job.attempts,
        worker=job.worker,
        lease_expires=job.lease_expire_time.ToNanoseconds() / 1e9,
        tenant=job.tenant,
    )


def error_status(error: JobError) -> status_pb2.Status:
    """``google.rpc.Status`` with BadRequest details when fields are to blame."""
    return to_status_proto(ServiceError(error.code, error.message, list(error.violations)))


def error_of(status: status_pb2.Status) -> JobError:
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    return JobError(code, status.message, tuple(violations))


def report_of(result: pb.JobResult) -> dict[str, Any]:
    """A report from a stored ``JobResult`` (rows stored before reports were kept whole).

    It holds what the message holds, under the report's keys, so that
    ``convert.job_result`` makes the same message of it again.
    """
    report = _plain(result)
    for cand in report.get("candidates", []):
        if "metrics" in cand:
            cand["figures"] = cand.pop("metrics")
    return report


def _plain(msg: Message) -> dict[str, Any]:
    """Set fields as plain values: Structs as dicts, enums by name, numbers as numbers."""
    out: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        if fd.type == fd.TYPE_MESSAGE and fd.message_type.full_name == "google.protobuf.Struct":
            out[fd.name] = json_format.MessageToDict(value)
        elif fd.type == fd.TYPE_MESSAGE:
            items = [_plain(v) for v in value] if fd.is_repeated else _plain(value)
            out[fd.name] = items
        elif fd.type == fd.TYPE_ENUM:
            out[fd.name] = fd.enum_type.values_by_number[value].name
        else:
            out[fd.name] = list(value) if fd.is_repeated else value
    return out


def plan_spec(request: pb.PlanPruningRequest) -> bytes:
    """A PlanPruning request, validated, as the serialized JobSpec a worker plans.

    Raises:
        ServiceError: INVALID_ARGUMENT naming the offending field.
    """
    from secateur.pruner.errors import InvalidSpecError
    from secateur.pruner.scoring import require_data

    if not request.model_uri.strip():
        raise convert.invalid("model_uri", "model_uri is required. Received: an empty string")
    try:
        # A plan reads no data: data-driven criteria (taylor) need a job.
        require_data(convert.prune_spec(request.pruning).criterion, False)
    except InvalidSpecError as exc:
        path = convert.field_path(exc.field).removeprefix("spec.")
        raise convert.invalid(path, str(exc)) from exc
    spec = pb.JobSpec(model_uri=request.model_uri, pruning=request.pruning)
    return spec.SerializeToString()
