"""The server's shared error types and one mapping from typed errors to status codes.

Every part of the server (the pipeline, the job store, the workers, the gRPC
edge) raises these, and nothing here imports any of them back:

- :class:`StartupError`: a server or worker cannot start.
- :class:`ServiceError`: an error raised on purpose, with its status code
  and ``google.rpc.BadRequest`` field violations where a field is to blame.

:func:`status_of` maps known exceptions (by class name, so that TensorFlow is
not imported here) to a :class:`ServiceError`; it gives a failed job its
``error`` and, through :mod:`secateur.server.api.error_interceptor`, an RPC
its status. Unexpected exceptions become INTERNAL with the traceback logged
on the server and an incident id, never the traceback itself, sent to the client.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

log = logging.getLogger("secateur.server")


# gRPC carries a status in headers (grpc-message, percent-encoded, and
# grpc-status-details-bin, base64) whose whole size a peer caps at 8-16 KiB;
# beyond that the client gets RESOURCE_EXHAUSTED instead of the error. These
# caps (UTF-8 bytes) keep a status under 7 KiB however much input it echoes,
# even all non-ASCII (3 bytes percent-encoded per byte of grpc-message).
MAX_MESSAGE_BYTES = 1024
MAX_DESCRIPTION_BYTES = 200
MAX_FIELD_BYTES = 100
MAX_VIOLATIONS = 6
#: How much of a received value a message echoes (``Received: ...``).
MAX_ECHO_CHARS = 200


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, the cut marked ``…(N more chars)``."""
    if len(text.encode()) <= limit:
        return text
    keep = text.encode()[: max(limit - 24, 0)].decode(errors="ignore")
    return f"{keep}…({len(text) - len(keep)} more chars)"


def echo(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """A received value as a message shows it (``repr`` for strings), cut to ``limit`` chars."""
    text = repr(value) if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text) - limit} more chars)"


class StartupError(Exception):
    """The server or a worker cannot start; the message says why and what to do."""


@dataclass
class ServiceError(Exception):
    """An error the service raises on purpose, with its status code.

    Messages and violations are clipped (see ``MAX_MESSAGE_BYTES``) so that
    an error echoing a huge input still reaches the client as itself.
    """

    code: grpc.StatusCode
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)
    #: Seconds a client should wait before retrying (``google.rpc.RetryInfo``); None: no advice.
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        self.message = clip(self.message, MAX_MESSAGE_BYTES)
        kept = self.violations[:MAX_VIOLATIONS]
        notes = [""] * len(kept)
        if len(self.violations) > MAX_VIOLATIONS:
            notes[-1] = f" (and {len(self.violations) - MAX_VIOLATIONS} more violations)"
        self.violations = [
            (clip(f, MAX_FIELD_BYTES), clip(d, MAX_DESCRIPTION_BYTES - len(note)) + note)
            for (f, d), note in zip(kept, notes, strict=True)
        ]

    def __str__(self) -> str:
        return self.message


def _by_name() -> dict[str, grpc.StatusCode]:
    """Exception class name -> code; names avoid importing TensorFlow here."""
    c = grpc.StatusCode
    return {
        "InvalidSpecError": c.INVALID_ARGUMENT,
        "DataError": c.INVALID_ARGUMENT,
        "InvalidUriError": c.INVALID_ARGUMENT,
        "ModelLoadError": c.INVALID_ARGUMENT,
        "UnsafeModelError": c.INVALID_ARGUMENT,  # the file itself is refused, whatever the state
        "StorageNotFoundError": c.NOT_FOUND,
        "StoragePermissionError": c.PERMISSION_DENIED,
        "StorageExistsError": c.ALREADY_EXISTS,
        "StorageUnreachableError": c.UNAVAILABLE,
        "DiskBudgetError": c.FAILED_PRECONDITION,  # the model does not fit the worker's disk
        "DownloadTooLargeError": c.RESOURCE_EXHAUSTED,  # over --max-model-bytes
        "StoreUnavailableError": c.UNAVAILABLE,  # the PostgreSQL job store did not answer
        "UnsupportedModelError": c.FAILED_PRECONDITION,
        "PlanError": c.FAILED_PRECONDITION,
        "TargetUnreachableError": c.FAILED_PRECONDITION,  # the message holds the best reached
        "PlanMismatchError": c.FAILED_PRECONDITION,
        "EmptyGroupError": c.FAILED_PRECONDITION,
        "ExportError": c.FAILED_PRECONDITION,  # the model has an op an asked-for format lacks
        "CancelledError": c.CANCELLED,
    }


_CODES = _by_name()


def status_of(exc: BaseException) -> ServiceError | None:
    """The status a known exception maps to; None for unexpected ones."""
    if isinstance(exc, ServiceError):
        return exc
    for cls in type(exc).__mro__:
        code = _CODES.get(cls.__name__)
        if code is not None:
            violations = []
            fld = getattr(exc, "field", "")
            if code is grpc.StatusCode.INVALID_ARGUMENT and fld:
                violations.append((fld, str(exc)))
            return ServiceError(code, str(exc), violations)
    return None


def to_status_proto(err: ServiceError) -> status_pb2.Status:
    """google.rpc.Status with BadRequest details when fields are to blame."""
    retry = err.retry_after_s
    err = ServiceError(err.code, err.message, list(err.violations))  # clipped, even if mutated
    status = status_pb2.Status(code=err.code.value[0], message=err.message)
    if retry is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(int(retry * 1e9))
        detail = any_pb2.Any()
        detail.Pack(info)
        status.details.append(detail)
    if err.violations:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in err.violations
                ]
            )
        )
        status.details.append(detail)
    return status


def new_incident() -> str:
    """An id that ties a client-facing INTERNAL error to its server log entry."""
    return uuid.uuid4().hex[:12]


def incident_message(what: str, incident: str) -> str:
    """The client-facing text of an INTERNAL error: what failed and where the log has more."""
    return f"internal error: {what}; see the server log for incident {incident}"


def internal_error(exc: BaseException, where: str) -> ServiceError:
    """INTERNAL for an unexpected exception, its traceback logged under a new incident id."""
    incident = new_incident()
    log.error("internal error in %s (incident %s)", where, incident, exc_info=exc)
    return ServiceError(
        grpc.StatusCode.INTERNAL, f"internal error; see the server log for incident {incident}"
    )


def code_name(code: int) -> str:
    return code_pb2.Code.Name(code)
