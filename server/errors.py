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


@dataclass
class ServiceError(Exception):
    """An error the service raises on purpose, with its status code."""

    code: grpc.StatusCode
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)

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
        "StorageNotFoundError": c.NOT_FOUND,
        "StoragePermissionError": c.PERMISSION_DENIED,
        "StorageExistsError": c.ALREADY_EXISTS,
        "StorageUnreachableError": c.UNAVAILABLE,
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
    """Turns exceptions raised by handlers into statuses (see module docstring)."""

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
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    err = status_of(exc) or internal_error(exc, method)
    await context.abort_with_status(rpc_status.to_status(to_status_proto(err)))


def _wrap_unary(behavior: Any, method: str) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in _abort
            await _abort(context, exc, method)

    return wrapped


def _wrap_stream(behavior: Any, method: str) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in _abort
            await _abort(context, exc, method)

    return wrapped
