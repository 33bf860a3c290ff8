"""One mapping from typed errors to gRPC status codes, and the interceptor using it.

The servicer stays thin: it converts messages and calls the job manager;
anything raised on the way is turned into a status here, with
``google.rpc.BadRequest`` field violations where a field is to blame.
Unexpected exceptions become INTERNAL with the traceback logged on the
server and an incident id, never the traceback itself, sent to the client.

The same mapping (:func:`status_of`) gives a failed job its ``error``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

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


@dataclass
class ServiceError(Exception):
    """An error the service raises on purpose, with its status code.

    Messages and violations are clipped (see ``MAX_MESSAGE_BYTES``) so that
    an error echoing a huge input still reaches the client as itself.
    """

    code: grpc.StatusCode
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)

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
        "StoreUnavailableError": c.UNAVAILABLE,  # the PostgreSQL job store did not answer
        "UnsupportedModelError": c.FAILED_PRECONDITION,
        "PlanError": c.FAILED_PRECONDITION,
        "PlanMismatchError": c.FAILED_PRECONDITION,
        "EmptyGroupError": c.FAILED_PRECONDITION,
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
    err = ServiceError(err.code, err.message, list(err.violations))  # clipped, even if mutated
    status = status_pb2.Status(code=err.code.value[0], message=err.message)
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


def internal_error(exc: BaseException, where: str) -> ServiceError:
    incident = uuid.uuid4().hex[:12]
    log.error("internal error in %s (incident %s)", where, incident, exc_info=exc)
    return ServiceError(
        grpc.StatusCode.INTERNAL, f"internal error; see the server log for incident {incident}"
    )


def code_name(code: int) -> str:
    return code_pb2.Code.Name(code)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions raised by handlers into statuses (see module docstring).

    Args:
        validate: called with every request before its handler runs (the
            service bounds request sizes with it); what it raises is mapped too.
    """

    def __init__(self, validate: Callable[[Any], None] | None = None) -> None:
        self.validate = validate or (lambda _request: None)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, self.validate),
                request_deserializer=_safe_deserializer(handler.request_deserializer, method),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, self.validate),
                request_deserializer=_safe_deserializer(handler.request_deserializer, method),
                response_serializer=handler.response_serializer,
            )
        return handler


@dataclass(frozen=True)
class _Malformed:
    """Stands in for a request whose bytes did not decode (see _safe_deserializer)."""

    message_type: str
    size: int

    def error(self) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid {self.message_type} message (protobuf decoding "
            f"failed). Received: {self.size} bytes",
        )


def _safe_deserializer(deserializer: Any, method: str) -> Any:
    """``deserializer`` returning a :class:`_Malformed` instead of raising.

    grpc answers an exception raised while decoding with UNKNOWN and the Python
    exception's class and text, before any handler runs; the wrapped handlers
    turn the stand-in into INVALID_ARGUMENT instead.
    """
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    message_type = getattr(descriptor, "full_name", "") or f"{method} request"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - DecodeError, or whatever else bad bytes raise
            return _Malformed(message_type, len(data))

    return deserialize


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    err = status_of(exc) or internal_error(exc, method)
    await context.abort_with_status(rpc_status.to_status(to_status_proto(err)))


def _wrap_unary(behavior: Any, method: str, validate: Callable[[Any], None]) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Malformed):
                raise request.error()
            validate(request)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in _abort
            await _abort(context, exc, method)

    return wrapped


def _wrap_stream(behavior: Any, method: str, validate: Callable[[Any], None]) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Malformed):
                raise request.error()
            validate(request)
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in _abort
            await _abort(context, exc, method)

    return wrapped
