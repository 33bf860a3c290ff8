"""The gRPC server: servicer, interceptors, health, reflection, TLS and tokens.

``build_server(options)`` returns a started :class:`RunningServer` (grpc.aio
on its own event loop thread when used from synchronous code, e.g. tests and
``secateur demo``); ``serve(options)`` runs until SIGTERM/SIGINT and shuts
down gracefully: health turns NOT_SERVING for ``shutdown_grace_s`` while calls
are still answered (a second signal cuts it short), then new RPCs are refused,
running workers are stopped and their jobs resume on the next start.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

# Served through reflection (the default descriptor pool) so generic clients
# (buf curl, grpcurl) can decode the google.rpc.Status details our errors
# carry: BadRequest field violations and the rest of error_details.
from google.rpc import error_details_pb2, status_pb2  # noqa: F401
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from secateur.server.api.error_interceptor import ErrorInterceptor
from secateur.server.api.jobs import JobManager, ManagerConfig
from secateur.server.api.metrics_interceptor import MetricsInterceptor
from secateur.server.api.tenants import NO_TENANT, Tenant, Tenants, bearer
from secateur.server.errors import StartupError
from secateur.server.jobstore import QueueStore, StoreOpenError, jobs_pb, open_store
from secateur.server.jobstore.sqlite import SqliteJobStore
from secateur.server.metrics import ServerMetrics
from secateur.server.pipeline import convert
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pb_grpc

log = logging.getLogger("secateur.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PruningService"].full_name
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class PruningServicer(pb_grpc.PruningServiceServicer):
    """Thin: converts messages to domain objects, calls the JobManager, converts back."""

    def __init__(self, manager: JobManager, tenants: Tenants | None = None) -> None:
        self.m = manager
        self.tenants = tenants

    def _tenant(self, context: Any) -> Tenant:
        """The caller's tenant (its token passed the TokenInterceptor); one for all without."""
        return self.tenants.of(context.invocation_metadata()) if self.tenants else NO_TENANT

    async def CreateJob(self, request: pb.CreateJobRequest, context: Any) -> pb.Job:
        sub = jobs_pb.submission(request)
        return jobs_pb.to_pb(await self.m.create(sub, self._tenant(context)))

    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.Job:
        return jobs_pb.to_pb(await self.m.get_async(request.name, self._tenant(context).name))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        state = jobs_pb.state_filter(request.state)
        tenant = self._tenant(context).name
        records, token = await self.m.list_async(
            state, request.page_size, request.page_token, tenant
        )
        return pb.ListJobsResponse(jobs=[jobs_pb.to_pb(r) for r in records], next_page_token=token)

    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.Job:
        return jobs_pb.to_pb(await self.m.cancel(request.name, self._tenant(context).name))

    async def WatchJob(self, request: pb.WatchJobRequest, context: Any) -> AsyncIterator[pb.Job]:
        async for record in self.m.watch(request.name, self._tenant(context).name):
            yield jobs_pb.to_pb(record)

    async def PlanPruning(
        self, request: pb.PlanPruningRequest, context: Any
    ) -> pb.PlanPruningResponse:
        spec = jobs_pb.plan_spec(request)
        plan = await self.m.plan(request.model_uri, spec, self._tenant(context))
        return convert.plan_response(plan)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens: ``authorization: Bearer <token>`` on every call.

    Health checks and reflection stay open so orchestrators can probe.
    """

    def __init__(self, tenants: Tenants) -> None:
        self.tenants = tenants

    async def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        token = bearer(details.invocation_metadata)
        if token and self.tenants.lookup(token) is not None:
            return handler
        why = "missing bearer token" if not token else "invalid bearer token"
        return _deny(handler, why)


def _deny(handler: Any, why: str) -> Any:
    async def unary(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def stream(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover - makes this an async generator

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


@dataclass(frozen=True)
class ServerOptions:
    state_dir: str
    port: int = 50051
    host: str = "127.0.0.1"
    metrics_port: int | None = None
    allowed_prefixes: tuple[str, ...] | None = None
    max_concurrent_jobs: int = 1
    max_queued_jobs: int = 100
    tokens: frozenset[str] = field(default_factory=frozenset)
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None
    grace_s: float = 10.0  # after stopping: how long in-flight calls may still finish
    shutdown_grace_s: float = 0.0  # serve(): NOT_SERVING this long before stopping
    #: ``--store``: "" is the embedded SQLite store under state_dir.
    store_url: str = ""
    lease_s: float = 30.0  # ``--lease-seconds``: a shared store's job lease (workers.loop)
    version: str = field(default_factory=lambda: importlib.metadata.version("secateur"))
    #: ``--trust-package``: installed packages whose registered classes model files may name.
    trusted_packages: tuple[str, ...] = ()
    #: ``--max-concurrent-plans``: PlanPruning / validate-only calls run at once.
    max_concurrent_plans: int = 2
    #: ``--max-model-bytes``: a model download stops (RESOURCE_EXHAUSTED) past it; None: no cap.
    max_model_bytes: int | None = None
    #: ``--max-job-seconds``: a job run's wall-time limit and the most a spec may ask.
    max_job_seconds: float | None = None
    #: ``--auth-token-file``: the tokens of each tenant (reloaded on SIGHUP); else ``tokens``.
    tenants: Tenants | None = None


class RunningServer:
    """A started server; ``port`` and ``metrics_port`` are the bound ones."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.port = 0
        self.metrics_port: int | None = None
        self.server: grpc.aio.Server | None = None
        self.manager: JobManager | None = None
        self.health = (
            health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        )
        self.metrics: Any = None
        self.store: QueueStore | None = None

    async def start(self) -> None:
        """Open the store, bind the ports, start the jobs; StartupError if one can't be.

        Anything already started is stopped again when a later step fails.
        """
        o = self.options
        try:
            if o.store_url:
                self.store = open_store(o.store_url, o.state_dir)
            else:
                self.store = SqliteJobStore(o.state_dir)
        except StoreOpenError as exc:
            raise StartupError(str(exc)) from exc
        try:
            interceptors = self._start_metrics()
            tenants = o.tenants or (Tenants.from_tokens(o.tokens) if o.tokens else None)
            if tenants is not None:
                interceptors.append(TokenInterceptor(tenants))
            interceptors.append(ErrorInterceptor(validate=convert.check_sizes))
            cfg = ManagerConfig(
                o.state_dir,
                o.allowed_prefixes,
                o.max_concurrent_jobs,
                o.max_queued_jobs,
                lease_s=o.lease_s,
                trusted_packages=o.trusted_packages,
                max_concurrent_plans=o.max_concurrent_plans,
                max_model_bytes=o.max_model_bytes,
                max_job_seconds=o.max_job_seconds,
            )
            self.manager = JobManager(cfg, self.store, self.metrics)
            self.server = grpc.aio.server(interceptors=interceptors, maximum_concurrent_rpcs=None)
            servicer = PruningServicer(self.manager, tenants)
            pb_grpc.add_PruningServiceServicer_to_server(servicer, self.server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
            )
            self.port = self._bind(self.server)
            await self.manager.start()
            await self.server.start()
        except BaseException:
            await self.stop()
            raise
        for name in ("", SERVICE_NAME):
            await _set_health(self.health, name, health_pb2.HealthCheckResponse.SERVING)
        log.info("secateur serving on %s:%d (metrics %s)", o.host, self.port, self.metrics_port)

    def _start_metrics(self) -> list[grpc.aio.ServerInterceptor]:
        """Serve /metrics when asked to; the interceptor list starts with its counter."""
        o = self.options
        if o.metrics_port is None:
            return []
        self.metrics = ServerMetrics()
        self.metrics.set_build_info(o.version)
        self.metrics.init_service(pb.DESCRIPTOR.services_by_name["PruningService"])
        try:
            self.metrics_port = self.metrics.serve(o.metrics_port, host=o.host)
        except OSError as exc:
            self.metrics = None
            raise StartupError(
                f"cannot serve metrics on {o.host}:{o.metrics_port}: {exc.strerror or exc}; "
                "choose another --metrics-port (-1 disables it)"
            ) from exc
        return [MetricsInterceptor(self.metrics)]

    def _bind(self, server: grpc.aio.Server) -> int:
        o = self.options
        address = f"{o.host}:{o.port}"
        try:
            if o.tls_cert and o.tls_key:
                creds = grpc.ssl_server_credentials(
                    [(o.tls_key, o.tls_cert)],
                    root_certificates=o.tls_client_ca,
                    require_client_auth=o.tls_client_ca is not None,
                )
                return server.add_secure_port(address, creds)
            return server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            raise StartupError(
                f"cannot listen on {address}: the port is in use or the address is not one "
                "of this machine's; choose another --port or --host"
            ) from exc

    async def drain(self, grace_s: float, cut_short: asyncio.Event | None = None) -> None:
        """Report NOT_SERVING for ``grace_s`` seconds while calls are still answered.

        Load balancers and probes see the server going away and send new work
        elsewhere before it stops; ``cut_short`` being set ends the wait early.
        """
        for name in ("", SERVICE_NAME):
            await _set_health(self.health, name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if grace_s <= 0:
            return
        log.info("NOT_SERVING; stopping in %gs (signal again to stop now)", grace_s)
        try:
            await asyncio.wait_for((cut_short or asyncio.Event()).wait(), grace_s)
        except TimeoutError:
            pass

    async def stop(self) -> None:
        for name in ("", SERVICE_NAME):
            await _set_health(self.health, name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.manager:
            await self.manager.shutdown()
        if self.server:
            await self.server.stop(self.options.grace_s)
        if self.metrics:
            self.metrics.stop()
        if self.store:
            self.store.close()


async def _set_health(servicer: Any, name: str, status: int) -> None:
    result = servicer.set(name, status)
    if asyncio.iscoroutine(result):
        await result


class BackgroundServer:
    """A RunningServer on its own event-loop thread (tests, the demo)."""

    def __init__(self, options: ServerOptions) -> None:
        self.loop = asyncio.new_event_loop()
        self.running = RunningServer(options)
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="secateur-server", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.running.start(), self.loop).result(timeout=60)

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def metrics_port(self) -> int | None:
        return self.running.metrics_port

    @property
    def target(self) -> str:
        return f"{self.running.options.host}:{self.running.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(options: ServerOptions) -> int:
    """Run until SIGTERM/SIGINT; exit code 0 after a graceful shutdown.

    Raises:
        StartupError: the server could not start (the message says why and what to do).
    """

    async def main() -> None:
        server = RunningServer(options)
        await server.start()
        print(
            f"secateur serving on {options.host}:{server.port}"
            + (f", metrics on :{server.metrics_port}" if server.metrics_port else ""),
            flush=True,
        )
        stop, now = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:  # the first signal drains, a second one cuts it short
            (now if stop.is_set() else stop).set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if options.tenants is not None:  # SIGHUP: read --auth-token-file again
            loop.add_signal_handler(signal.SIGHUP, options.tenants.reload)
        await stop.wait()
        log.info("shutting down")
        await server.drain(options.shutdown_grace_s, now)
        await server.stop()

    asyncio.run(main())
    return 0
