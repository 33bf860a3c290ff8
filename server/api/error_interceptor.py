"""The interceptor that turns whatever a handler raises into a gRPC status.

The servicer stays thin: it converts messages and calls the job manager;
anything raised on the way is mapped here through
:func:`secateur.server.errors.status_of`. Requests whose bytes do not decode
become INVALID_ARGUMENT instead of grpc's UNKNOWN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_status import rpc_status

from secateur.server.errors import ServiceError, internal_error, status_of, to_status_proto


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
