"""The gRPC server metrics interceptor (go-grpc-prometheus names and labels).

:class:`MetricsInterceptor` wraps every handler (unary or streaming,
coroutine, async generator or plain sync) and feeds the ``grpc_server_*``
series declared by :class:`~secateur.server.metrics.ServerMetrics`: started,
handled by code, handling seconds, messages received and sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from inspect import isasyncgenfunction, iscoroutinefunction
from typing import Any

import grpc
from grpc import aio

from secateur.server.metrics import ServerMetrics, rpc_type


def _split_method(full_method: str | bytes) -> tuple[str, str]:
    """``"/secateur.v1.PruningService/GetJob"`` -> (service, method)."""
    if isinstance(full_method, bytes):
        full_method = full_method.decode("utf-8", "replace")
    service, sep, method = full_method.lstrip("/").rpartition("/")
    if not sep:
        return "unknown", full_method
    return service, method


def _as_status_code(code: Any) -> grpc.StatusCode | None:
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:  # an int code (cygrpc)
        if candidate.value[0] == code:
            return candidate
    return None


class _SyncContextProxy:
    """Wraps the context of a synchronous handler to learn the status code.

    grpc.aio's context for sync handlers has no ``code()``; this one records
    what ``set_code``/``abort`` set and passes everything else through.
    """

    def __init__(self, context: Any) -> None:
        self._context = context
        self._code: grpc.StatusCode | None = None

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code
        self._context.set_code(code)

    def abort(self, code: grpc.StatusCode, details: str = "", *args: Any, **kwargs: Any) -> Any:
        self._code = code
        return self._context.abort(code, details, *args, **kwargs)

    def abort_with_status(self, status: grpc.Status) -> Any:
        self._code = status.code
        return self._context.abort_with_status(status)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _Call:
    """One RPC being measured."""

    __slots__ = ("_context", "_done", "_labels", "_metrics", "_start")

    def __init__(self, metrics: ServerMetrics, labels: tuple[str, str, str], context: Any) -> None:
        self._metrics = metrics
        self._labels = labels
        self._context = context
        self._done = False
        metrics.grpc_started.labels(*labels).inc()
        self._start = time.perf_counter()

    def received(self) -> None:
        self._metrics.grpc_msg_received.labels(*self._labels).inc()

    def sent(self) -> None:
        self._metrics.grpc_msg_sent.labels(*self._labels).inc()

    def _context_code(self) -> grpc.StatusCode | None:
        try:
            return _as_status_code(self._context.code())
        except (AttributeError, NotImplementedError):  # a context without code()
            return None

    def finished(self) -> grpc.StatusCode:
        """The handler returned: the code it set, else OK."""
        code = self._context_code() or grpc.StatusCode.OK
        self._record(code)
        return code

    def failed(self, exc: BaseException) -> grpc.StatusCode:
        """The handler raised ``exc``: map it the way grpc.aio does."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            # The client went away (or the stream was closed under us).
            code = grpc.StatusCode.CANCELLED
        else:
            # context.abort(code) sets the code and raises AbortError; other
            # exceptions become UNKNOWN unless the handler set a code first.
            set_code = self._context_code()
            code = set_code if set_code not in (None, grpc.StatusCode.OK) else None
            code = code or grpc.StatusCode.UNKNOWN
        self._record(code)
        return code

    def _record(self, code: grpc.StatusCode) -> None:
        if self._done:
            return
        self._done = True
        m = self._metrics
        m.grpc_handled.labels(*self._labels, code.name).inc()
        m.grpc_handling_seconds.labels(*self._labels).observe(time.perf_counter() - self._start)


class MetricsInterceptor(aio.ServerInterceptor):
    """Counts and times every RPC into a :class:`ServerMetrics`.

    Wraps the handler found by the rest of the chain (unary_unary,
    unary_stream, stream_unary, stream_stream; coroutine, async generator
    and plain sync handlers alike) and passes ``None`` (an unknown method)
    through untouched. Place it first in the interceptor list so it sees the
    codes produced by the interceptors after it.
    """

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        request_streaming = bool(handler.request_streaming)
        response_streaming = bool(handler.response_streaming)
        service, method = _split_method(handler_call_details.method)
        labels = (rpc_type(request_streaming, response_streaming), service, method)
        metrics = self._metrics
        kwargs: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if not request_streaming and not response_streaming:
            if handler.unary_unary is None:
                return handler
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary_response(handler.unary_unary, metrics, labels, False), **kwargs
            )
        if not request_streaming:
            if handler.unary_stream is None:
                return handler
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream_response(handler.unary_stream, metrics, labels, False), **kwargs
            )
        if not response_streaming:
            if handler.stream_unary is None:
                return handler
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary_response(handler.stream_unary, metrics, labels, True), **kwargs
            )
        if handler.stream_stream is None:
            return handler
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(handler.stream_stream, metrics, labels, True), **kwargs
        )


def _count_requests(request: Any, call: _Call, request_streaming: bool) -> Any:
    """The request, or for streaming requests an iterator that counts messages."""
    if not request_streaming:
        call.received()
        return request
    if hasattr(request, "__aiter__"):

        async def counted_async(source: AsyncIterable[Any]) -> AsyncIterator[Any]:
            async for message in source:
                call.received()
                yield message

        return counted_async(request)
    if hasattr(request, "__iter__"):

        def counted(source: Iterable[Any]) -> Iterator[Any]:
            for message in source:
                call.received()
                yield message

        return counted(request)
    return request


def _wrap_unary_response(
    behavior: Callable[..., Any],
    metrics: ServerMetrics,
    labels: tuple[str, str, str],
    request_streaming: bool,
) -> Callable[..., Any]:
    if iscoroutinefunction(behavior):

        async def unary_async(request: Any, context: Any) -> Any:
            call = _Call(metrics, labels, context)
            try:
                response = await behavior(
                    _count_requests(request, call, request_streaming), context
                )
            except BaseException as exc:
                call.failed(exc)
                raise
            if call.finished() is grpc.StatusCode.OK:
                call.sent()
            return response

        return unary_async

    def unary_sync(request: Any, context: Any) -> Any:
        proxy = _SyncContextProxy(context)
        call = _Call(metrics, labels, proxy)
        try:
            response = behavior(_count_requests(request, call, request_streaming), proxy)
        except BaseException as exc:
            call.failed(exc)
            raise
        if call.finished() is grpc.StatusCode.OK:
            call.sent()
        return response

    return unary_sync


def _wrap_stream_response(
    behavior: Callable[..., Any],
    metrics: ServerMetrics,
    labels: tuple[str, str, str],
    request_streaming: bool,
) -> Callable[..., Any]:
    if isasyncgenfunction(behavior):

        async def stream_async_gen(request: Any, context: Any) -> AsyncIterator[Any]:
            call = _Call(metrics, labels, context)
            try:
                async for response in behavior(
                    _count_requests(request, call, request_streaming), context
                ):
                    call.sent()
                    yield response
            except BaseException as exc:
                call.failed(exc)
                raise
            call.finished()

        return stream_async_gen

    if iscoroutinefunction(behavior):
        # Reader/writer style: the handler calls context.write(); those
        # messages are not counted in grpc_server_msg_sent_total.
        async def stream_coroutine(request: Any, context: Any) -> Any:
            call = _Call(metrics, labels, context)
            try:
                result = await behavior(_count_requests(request, call, request_streaming), context)
            except BaseException as exc:
                call.failed(exc)
                raise
            call.finished()
            return result

        return stream_coroutine

    def stream_sync(request: Any, context: Any) -> Iterator[Any]:
        proxy = _SyncContextProxy(context)
        call = _Call(metrics, labels, proxy)
        try:
            for response in behavior(_count_requests(request, call, request_streaming), proxy):
                call.sent()
                yield response
        except BaseException as exc:
            call.failed(exc)
            raise
        call.finished()

    return stream_sync
