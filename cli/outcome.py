"""Exit codes (see the package docstring) and the code a job or a failed call stands for.

Protobuf only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from secateur.v1 import pruning_pb2

if TYPE_CHECKING:
    from secateur.client.client import ClientError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_GATE, EXIT_CANCELLED = 0, 1, 2, 3, 4

# google.rpc.Code numbers that mean the request or its inputs were wrong.
BAD_INPUT_CODES = frozenset(
    {
        3,  # INVALID_ARGUMENT
        5,  # NOT_FOUND
        6,  # ALREADY_EXISTS
        7,  # PERMISSION_DENIED
        8,  # RESOURCE_EXHAUSTED
        9,  # FAILED_PRECONDITION
        16,  # UNAUTHENTICATED
    }
)
CODE_CANCELLED = 1
EXIT_CODES_EPILOG = (
    "Exit codes: 0 ok (status: also a job still queued or running); 1 internal error, "
    "a job that failed on the server's side, server unavailable; 2 bad input (invalid spec, "
    "model or data, URI not found / not allowed, version exists; INVALID_ARGUMENT, NOT_FOUND, "
    "PERMISSION_DENIED, FAILED_PRECONDITION, ALREADY_EXISTS, RESOURCE_EXHAUSTED, "
    "UNAUTHENTICATED); 3 accuracy gate failed, nothing published; 4 cancelled."
)


def gate_failed(job: pruning_pb2.Job) -> bool:
    """The job ran but its accuracy gate published nothing.

    The server reports a failed gate as FAILED with FAILED_PRECONDITION and a
    result whose decision says "no candidate within ...; nothing published";
    a SUCCEEDED job with a budget and nothing published counts too.
    """
    if not job.HasField("result") or job.result.output_uri:
        return False
    decision = job.result.decision
    if "no candidate within" in decision:
        return job.state in (pruning_pb2.Job.STATE_SUCCEEDED, pruning_pb2.Job.STATE_FAILED)
    if job.state == pruning_pb2.Job.STATE_SUCCEEDED:
        return job.spec.HasField("max_accuracy_drop")
    return (
        job.state == pruning_pb2.Job.STATE_FAILED
        and job.error.code == 9  # FAILED_PRECONDITION
        and "nothing published" in decision
        and len(job.result.candidates) > 0
    )


def exit_code_for_job(job: pruning_pb2.Job) -> int:
    """The exit code a job's state stands for (0 while it is queued or running)."""
    if gate_failed(job):
        return EXIT_GATE
    if job.state == pruning_pb2.Job.STATE_CANCELLED:
        return EXIT_CANCELLED
    if job.state == pruning_pb2.Job.STATE_FAILED:
        if job.error.code in BAD_INPUT_CODES:
            return EXIT_BAD_INPUT
        return EXIT_CANCELLED if job.error.code == CODE_CANCELLED else EXIT_INTERNAL
    return EXIT_OK


def exit_code_for_error(err: ClientError) -> int:
    """The exit code of a failed call: the server refused (2), was unreachable (1), ..."""
    code = err.code.value[0]
    if code in BAD_INPUT_CODES:
        return EXIT_BAD_INPUT
    return EXIT_CANCELLED if code == CODE_CANCELLED else EXIT_INTERNAL
