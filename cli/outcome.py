"""Exit codes (see the package docstring) and the code a job or a failed call stands for.

Protobuf only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from secateur.client.protospec import code_name
from secateur.v1 import pruning_pb2

if TYPE_CHECKING:
    from secateur.client.client import ClientError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_GATE, EXIT_CANCELLED = 0, 1, 2, 3, 4

# google.rpc.Code names that mean the request or its inputs were wrong.
BAD_INPUT_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "UNAUTHENTICATED",
    }
)
EXIT_CODES_EPILOG = (
    "Exit codes: 0 ok (status: also a job still queued or running); 1 internal error, "
    "a job that failed on the server's side, server unavailable; 2 bad input (invalid spec, "
    "model or data, URI not found / not allowed, version exists; INVALID_ARGUMENT, NOT_FOUND, "
    "PERMISSION_DENIED, FAILED_PRECONDITION, ALREADY_EXISTS, RESOURCE_EXHAUSTED, "
    "UNAUTHENTICATED); 3 accuracy gate failed, nothing published; 4 cancelled."
)


def gate_failed(job: pruning_pb2.Job) -> bool:
    """The job ran but its accuracy gate published nothing (the result's outcome says so)."""
    return job.result.outcome == pruning_pb2.JobResult.OUTCOME_GATE_FAILED


def _by_code(name: str) -> int:
    if name in BAD_INPUT_CODES:
        return EXIT_BAD_INPUT
    return EXIT_CANCELLED if name == "CANCELLED" else EXIT_INTERNAL


def exit_code_for_job(job: pruning_pb2.Job) -> int:
    """The exit code a job's state stands for (0 while it is queued or running)."""
    if gate_failed(job):
        return EXIT_GATE
    if job.state == pruning_pb2.Job.STATE_CANCELLED:
        return EXIT_CANCELLED
    if job.state == pruning_pb2.Job.STATE_FAILED:
        return _by_code(code_name(job.error.code))
    return EXIT_OK


def exit_code_for_error(err: ClientError) -> int:
    """The exit code of a failed call: the server refused (2), was unreachable (1), ..."""
    return _by_code(err.code.name)
