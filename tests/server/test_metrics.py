"""Tests of secateur.server.metrics: a real grpc.aio server, a real Prometheus, promtool."""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc import aio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from secateur.server.api.metrics_interceptor import MetricsInterceptor
from secateur.server.metrics import (
    FIGURE_KEYS,
    OUTCOMES,
    STAGE_DURATION_BUCKETS,
    ServerMetrics,
)
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pb_grpc
from tests.server.prometheus_fixture import (  # noqa: F401
    SCRAPE_JOB,
    PrometheusServer,
    Sample,
    prometheus_fixture,
    promtool_binary,
)

SERVICE = "secateur.v1.PruningService"
# Every label name a series may carry in Prometheus: ours plus the target labels.
ALLOWED_LABELS = {
    "__name__",
    "job",
    "instance",
    "grpc_type",
    "grpc_service",
    "grpc_method",
    "grpc_code",
    "outcome",
    "stage",
    "variant",
    "le",
    "version",
    "python",
    "grpc",
}

# --------------------------------------------------------------------------- helpers

ParsedSample = tuple[str, dict[str, str], float]


def parse(text: str) -> list[ParsedSample]:
    """Every sample of a /metrics text as (name, labels, value)."""
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode("utf-8")


def value(samples: list[ParsedSample], name: str, **labels: str) -> float | None:
    """The value of the one sample called ``name`` whose labels include ``labels``."""
    found = [
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


def instance(metrics: ServerMetrics) -> str:
    return f"127.0.0.1:{metrics.port}"


def only_value(samples: list[Sample]) -> float:
    assert len(samples) == 1, samples
    return samples[0].value


def equals(expected: float) -> Callable[[list[Sample]], bool]:
    return lambda samples: len(samples) == 1 and abs(samples[0].value - expected) < 1e-9


async def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def populate_domain(m: ServerMetrics) -> None:
    """A few jobs' worth of domain events."""
    m.set_build_info("1.2.3")
    for _ in range(3):
        m.job_submitted()
    m.set_queue(queued=2, running=1)
    for stage, seconds in [
        ("FETCHING", 0.3),
        ("FINE_TUNING", 40),
        ("FINE_TUNING", 50),
        ("FINE_TUNING", 70),
        ("EXPORTING", 2),
    ]:
        m.stage_finished(stage, seconds)
    m.job_completed("succeeded", 130)
    m.job_completed("succeeded", 200)
    m.job_completed("gate_failed", 90)
    m.record_figures(
        original={
            "params": 1_000_000,
            "weight_bytes": 4_000_000,
            "flops": 3.0e8,
            "peak_memory_bytes": 512_000_000,
            "train_step_seconds": 0.02,
            "accuracy": 0.91,
        },
        pruned={
            "params": 400_000,
            "weight_bytes": 1_600_000,
            "flops": 1.2e8,
            "peak_memory_bytes": None,
            "train_step_seconds": 0.012,
            "accuracy": 0.9,
        },
    )


# --------------------------------------------------------------------------- gRPC fakes


class FakeServicer(pb_grpc.PruningServiceServicer):
    """GetJob: a job, or NOT_FOUND for jobs/missing; WatchJob: 3 snapshots."""

    async def GetJob(self, request: pb.GetJobRequest, context: aio.ServicerContext) -> pb.Job:
        if request.name == "jobs/missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such job")
        return pb.Job(name=request.name, state=pb.Job.STATE_SUCCEEDED)

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: aio.ServicerContext
    ) -> pb.ListJobsResponse:
        raise RuntimeError("boom")

    async def CancelJob(self, request: pb.CancelJobRequest, context: aio.ServicerContext) -> pb.Job:
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("not cancellable")
        return pb.Job()

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.Job]:
        if request.name == "jobs/forever":
            yield pb.Job(name=request.name, state=pb.Job.STATE_RUNNING)
            await asyncio.Event().wait()
        for state in (pb.Job.STATE_QUEUED, pb.Job.STATE_RUNNING, pb.Job.STATE_SUCCEEDED):
            yield pb.Job(name=request.name, state=state)


class PassThroughInterceptor(aio.ServerInterceptor):
    """Does nothing; proves the metrics interceptor works with others before it."""

    def __init__(self) -> None:
        self.seen = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        self.seen += 1
        return await continuation(handler_call_details)


class DenyInterceptor(aio.ServerInterceptor):
    """Answers PERMISSION_DENIED for calls with metadata x-deny=1 (like an auth interceptor)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if handler is None or metadata.get("x-deny") != "1":
            return handler

        async def deny(request: Any, context: aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied")

        return grpc.unary_unary_rpc_method_handler(
            deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def exercise_pruning_service(metrics: ServerMetrics) -> PassThroughInterceptor:
    """Run a PruningService with the interceptor chain and make a known set of calls."""
    passthrough = PassThroughInterceptor()
    server = aio.server(interceptors=[passthrough, MetricsInterceptor(metrics), DenyInterceptor()])
    pb_grpc.add_PruningServiceServicer_to_server(FakeServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.PruningServiceStub(channel)
            for _ in range(3):
                job = await stub.GetJob(pb.GetJobRequest(name="jobs/1"))
                assert job.name == "jobs/1"
            for _ in range(2):
                with pytest.raises(aio.AioRpcError) as err:
                    await stub.GetJob(pb.GetJobRequest(name="jobs/missing"))
                assert err.value.code() is grpc.StatusCode.NOT_FOUND
            with pytest.raises(aio.AioRpcError) as err:
                await stub.GetJob(pb.GetJobRequest(name="jobs/1"), metadata=(("x-deny", "1"),))
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(aio.AioRpcError) as err:
                await stub.ListJobs(pb.ListJobsRequest())
            assert err.value.code() is grpc.StatusCode.UNKNOWN
            with pytest.raises(aio.AioRpcError) as err:
                await stub.CancelJob(pb.CancelJobRequest(name="jobs/1"))
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            states = [j.state async for j in stub.WatchJob(pb.WatchJobRequest(name="jobs/1"))]
            assert states == [pb.Job.STATE_QUEUED, pb.Job.STATE_RUNNING, pb.Job.STATE_SUCCEEDED]
            # A client that cancels a stream it is reading.
            call = stub.WatchJob(pb.WatchJobRequest(name="jobs/forever"))
            first = await call.read()
            assert first.state == pb.Job.STATE_RUNNING
            call.cancel()
            await wait_until(
                lambda: (
                    value(
                        parse(metrics.render()),
                        "grpc_server_handled_total",
                        grpc_method="WatchJob",
                        grpc_code="CANCELLED",
                    )
                    == 1
                )
            )
            # An unknown method passes through the interceptor (None) untouched.
            unknown = channel.unary_unary(f"/{SERVICE}/NoSuchMethod")
            with pytest.raises(aio.AioRpcError) as err:
                await unknown(b"")
            assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)
    return passthrough


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def grpc_metrics() -> Iterator[ServerMetrics]:
    metrics = ServerMetrics()
    metrics.init_service(pb.DESCRIPTOR.services_by_name["PruningService"])
    metrics.serve(0)
    yield metrics
    metrics.stop()


@pytest.fixture(scope="module")
def domain_metrics() -> Iterator[ServerMetrics]:
    metrics = ServerMetrics()
    metrics.serve(0)
    yield metrics
    metrics.stop()


@pytest.fixture(scope="module")
def prom(
    prometheus: Callable[[list[str]], PrometheusServer],
    grpc_metrics: ServerMetrics,
    domain_metrics: ServerMetrics,
) -> PrometheusServer:
    """One real Prometheus scraping both endpoints every second."""
    return prometheus([instance(grpc_metrics), instance(domain_metrics)])


# --------------------------------------------------------------------------- tests: gRPC


def test_grpc_metrics_in_text_and_in_prometheus(
    prom: PrometheusServer, grpc_metrics: ServerMetrics
) -> None:
    passthrough = asyncio.run(exercise_pruning_service(grpc_metrics))
    assert passthrough.seen == 11  # every RPC, the unknown method included

    # /metrics text, parsed.
    assert grpc_metrics.url is not None
    samples = parse(fetch(grpc_metrics.url))
    get = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "GetJob"}
    watch = {"grpc_type": "server_stream", "grpc_service": SERVICE, "grpc_method": "WatchJob"}
    assert value(samples, "grpc_server_started_total", **get) == 6
    assert value(samples, "grpc_server_handled_total", **get, grpc_code="OK") == 3
    assert value(samples, "grpc_server_handled_total", **get, grpc_code="NOT_FOUND") == 2
    assert value(samples, "grpc_server_handled_total", **get, grpc_code="PERMISSION_DENIED") == 1
    assert value(samples, "grpc_server_handled_total", **get, grpc_code="INTERNAL") == 0
    assert value(samples, "grpc_server_handling_seconds_count", **get) == 6
    assert value(samples, "grpc_server_handling_seconds_bucket", **get, le="+Inf") == 6
    assert value(samples, "grpc_server_msg_received_total", **get) == 6
    assert value(samples, "grpc_server_msg_sent_total", **get) == 3
    assert (
        value(samples, "grpc_server_handled_total", grpc_method="ListJobs", grpc_code="UNKNOWN")
        == 1
    )
    assert (
        value(
            samples,
            "grpc_server_handled_total",
            grpc_method="CancelJob",
            grpc_code="FAILED_PRECONDITION",
        )
        == 1
    )
    assert value(samples, "grpc_server_started_total", **watch) == 2
    assert value(samples, "grpc_server_handled_total", **watch, grpc_code="OK") == 1
    assert value(samples, "grpc_server_handled_total", **watch, grpc_code="CANCELLED") == 1
    assert value(samples, "grpc_server_msg_sent_total", **watch) == 4
    # init_service made zero series for methods never called; unknown methods make none.
    assert value(samples, "grpc_server_started_total", grpc_method="PlanPruning") == 0
    assert value(samples, "grpc_server_started_total", grpc_method="NoSuchMethod") is None

    # The same figures through a real Prometheus.
    sel = f'instance="{instance(grpc_metrics)}",grpc_service="{SERVICE}"'
    prom.wait_for(f'grpc_server_started_total{{{sel},grpc_method="GetJob"}}', equals(6))
    for code, count in [("OK", 3), ("NOT_FOUND", 2), ("PERMISSION_DENIED", 1)]:
        prom.wait_for(
            f'grpc_server_handled_total{{{sel},grpc_method="GetJob",grpc_code="{code}"}}',
            equals(count),
        )
    prom.wait_for(f'grpc_server_handling_seconds_count{{{sel},grpc_method="GetJob"}}', equals(6))
    prom.wait_for(
        f'grpc_server_handled_total{{{sel},grpc_type="server_stream",grpc_code="CANCELLED"}}',
        equals(1),
    )
    by_code = prom.query(
        f'sum by (grpc_code) (grpc_server_handled_total{{{sel},grpc_method="GetJob"}}) > 0'
    )
    assert {s.labels["grpc_code"]: s.value for s in by_code} == {
        "OK": 3,
        "NOT_FOUND": 2,
        "PERMISSION_DENIED": 1,
    }
    latency = prom.query(
        "histogram_quantile(0.99, sum by (le) "
        f'(grpc_server_handling_seconds_bucket{{{sel},grpc_method="GetJob"}}))'
    )
    assert 0 < only_value(latency) <= 10


def test_every_rpc_kind_and_code_is_counted() -> None:
    """unary/client/server/bidi streams, async, async-generator and sync handlers."""
    metrics = ServerMetrics()

    async def unary(request: bytes, context: aio.ServicerContext) -> bytes:
        return request

    async def server_stream(request: bytes, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(3):
            yield bytes([i])

    async def server_stream_writer(request: bytes, context: aio.ServicerContext) -> None:
        await context.write(b"a")
        await context.write(b"b")

    async def client_stream(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> bytes:
        return b"".join([r async for r in requests])

    async def bidi(
        requests: AsyncIterator[bytes], context: aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for r in requests:
            if r == b"abort":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad message")
            yield r

    def sync_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"abort":
            context.abort(grpc.StatusCode.NOT_FOUND, "missing")
        if request == b"raise":
            raise ValueError("boom")
        if request == b"code":
            context.set_code(grpc.StatusCode.ALREADY_EXISTS)
        return request

    def sync_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"1"
        yield b"2"

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ServerStreamWriter": grpc.unary_stream_rpc_method_handler(server_stream_writer),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "SyncUnary": grpc.unary_unary_rpc_method_handler(sync_unary),
        "SyncStream": grpc.unary_stream_rpc_method_handler(sync_stream),
    }

    async def scenario() -> None:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            server = aio.server(
                interceptors=[MetricsInterceptor(metrics)], migration_thread_pool=pool
            )
            server.add_generic_rpc_handlers(
                [grpc.method_handlers_generic_handler("test.Kinds", handlers)]
            )
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    assert await ch.unary_unary("/test.Kinds/Unary")(b"x") == b"x"
                    got = [m async for m in ch.unary_stream("/test.Kinds/ServerStream")(b"")]
                    assert got == [b"\x00", b"\x01", b"\x02"]
                    got = [m async for m in ch.unary_stream("/test.Kinds/ServerStreamWriter")(b"")]
                    assert got == [b"a", b"b"]
                    joined = await ch.stream_unary("/test.Kinds/ClientStream")(
                        iter([b"1", b"2", b"3"])
                    )
                    assert joined == b"123"
                    got = [
                        m async for m in ch.stream_stream("/test.Kinds/Bidi")(iter([b"p", b"q"]))
                    ]
                    assert got == [b"p", b"q"]
                    with pytest.raises(aio.AioRpcError) as err:
                        _ = [
                            m async for m in ch.stream_stream("/test.Kinds/Bidi")(iter([b"abort"]))
                        ]
                    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                    sync_unary_call = ch.unary_unary("/test.Kinds/SyncUnary")
                    assert await sync_unary_call(b"ok") == b"ok"
                    for request, code in [
                        (b"abort", grpc.StatusCode.NOT_FOUND),
                        (b"raise", grpc.StatusCode.UNKNOWN),
                        (b"code", grpc.StatusCode.ALREADY_EXISTS),
                    ]:
                        with pytest.raises(aio.AioRpcError) as err:
                            await sync_unary_call(request)
                        assert err.value.code() is code
                    got = [m async for m in ch.unary_stream("/test.Kinds/SyncStream")(b"")]
                    assert got == [b"1", b"2"]
            finally:
                await server.stop(None)

    asyncio.run(scenario())
    samples = parse(metrics.render())

    def handled(method: str, code: str) -> float | None:
        return value(samples, "grpc_server_handled_total", grpc_method=method, grpc_code=code)

    kinds = {
        "Unary": "unary",
        "ServerStream": "server_stream",
        "ServerStreamWriter": "server_stream",
        "ClientStream": "client_stream",
        "Bidi": "bidi_stream",
        "SyncUnary": "unary",
        "SyncStream": "server_stream",
    }
    for method, grpc_type in kinds.items():
        started = value(
            samples,
            "grpc_server_started_total",
            grpc_service="test.Kinds",
            grpc_method=method,
            grpc_type=grpc_type,
        )
        assert started, method
    for method in ("Unary", "ServerStream", "ServerStreamWriter", "ClientStream", "SyncStream"):
        assert handled(method, "OK") == 1, method
    assert handled("Bidi", "OK") == 1
    assert handled("Bidi", "INVALID_ARGUMENT") == 1
    assert handled("SyncUnary", "OK") == 1
    assert handled("SyncUnary", "NOT_FOUND") == 1
    assert handled("SyncUnary", "UNKNOWN") == 1
    assert handled("SyncUnary", "ALREADY_EXISTS") == 1

    def sent(method: str) -> float | None:
        return value(samples, "grpc_server_msg_sent_total", grpc_method=method)

    def received(method: str) -> float | None:
        return value(samples, "grpc_server_msg_received_total", grpc_method=method)

    assert sent("ServerStream") == 3
    assert sent("SyncStream") == 2
    assert sent("Bidi") == 2
    assert sent("Unary") == 1
    assert sent("SyncUnary") == 1  # only the OK call
    assert sent("ServerStreamWriter") is None  # context.write() is not counted
    assert received("ClientStream") == 3
    assert received("Bidi") == 3
    assert value(samples, "grpc_server_handling_seconds_count", grpc_method="SyncUnary") == 4


# --------------------------------------------------------------------------- tests: domain


def test_domain_metrics_in_prometheus(
    prom: PrometheusServer, domain_metrics: ServerMetrics
) -> None:
    populate_domain(domain_metrics)
    inst = f'instance="{instance(domain_metrics)}"'

    prom.wait_for(f'secateur_params{{{inst},variant="pruned"}}', equals(400_000))
    prom.wait_for(f'secateur_params{{{inst},variant="original"}}', equals(1_000_000))
    prom.wait_for(f"secateur_params_saved_ratio{{{inst}}}", equals(0.6))
    prom.wait_for(f'secateur_jobs_completed_total{{{inst},outcome="succeeded"}}', equals(2))
    prom.wait_for(f'secateur_jobs_completed_total{{{inst},outcome="gate_failed"}}', equals(1))
    prom.wait_for(f'secateur_jobs_completed_total{{{inst},outcome="failed"}}', equals(0))
    prom.wait_for(f"secateur_jobs_submitted_total{{{inst}}}", equals(3))
    prom.wait_for(f"secateur_jobs_queued{{{inst}}}", equals(2))
    prom.wait_for(f"secateur_jobs_running{{{inst}}}", equals(1))
    prom.wait_for(f'secateur_accuracy{{{inst},variant="pruned"}}', equals(0.9))
    prom.wait_for(f'secateur_train_step_seconds{{{inst},variant="original"}}', equals(0.02))
    prom.wait_for(f'secateur_weight_bytes{{{inst},variant="pruned"}}', equals(1_600_000))
    prom.wait_for(f'secateur_flops{{{inst},variant="pruned"}}', equals(1.2e8))
    prom.wait_for(f'secateur_peak_memory_bytes{{{inst},variant="original"}}', equals(512e6))
    # A None figure is not exported.
    assert prom.query(f'secateur_peak_memory_bytes{{{inst},variant="pruned"}}') == []
    build = prom.wait_for(f"secateur_build_info{{{inst}}}", equals(1))
    assert build[0].labels["version"] == "1.2.3"
    assert build[0].labels["grpc"] == grpc.__version__

    prom.wait_for(f'secateur_stage_duration_seconds_count{{{inst},stage="FINE_TUNING"}}', equals(3))
    # 40, 50 in (30, 60], 70 in (60, 120]: the median interpolates to 30 + 30 * 1.5 / 2.
    median = prom.query(
        "histogram_quantile(0.5, sum by (le) "
        f'(secateur_stage_duration_seconds_bucket{{{inst},stage="FINE_TUNING"}}))'
    )
    assert only_value(median) == pytest.approx(52.5)
    p90 = prom.query(
        "histogram_quantile(0.9, sum by (le) "
        f'(secateur_job_duration_seconds_bucket{{{inst},outcome="succeeded"}}))'
    )
    assert 120 < only_value(p90) <= 300
    buckets = prom.query(f'secateur_stage_duration_seconds_bucket{{{inst},stage="FETCHING"}}')
    les = sorted(float(s.labels["le"]) for s in buckets)
    assert les == [*map(float, STAGE_DURATION_BUCKETS), float("inf")]
    assert les[-2] >= 3600  # buckets reach hours

    # No job ids (or any unexpected label) on any series, in either endpoint.
    series = prom.query('{__name__=~"secateur_.+|grpc_server_.+"}')
    assert series
    for sample in series:
        assert set(sample.labels) <= ALLOWED_LABELS, sample.labels
        assert sample.labels["job"] == SCRAPE_JOB
    names = {s.labels["__name__"] for s in series}
    assert {"secateur_jobs_submitted_total", "secateur_stage_duration_seconds_bucket"} <= names


def test_no_job_labels_in_exposition() -> None:
    samples = parse(_full_metrics().render())
    labels = {k for _, lab, _ in samples for k in lab}
    assert labels <= ALLOWED_LABELS - {"job", "instance", "__name__"}
    assert not labels & {"job", "job_id", "name", "id"}


def _full_metrics() -> ServerMetrics:
    m = ServerMetrics()
    m.init_service(pb.DESCRIPTOR.services_by_name["PruningService"])
    populate_domain(m)
    return m


def test_promtool_check_metrics_is_clean() -> None:
    promtool = promtool_binary()
    m = _full_metrics()
    m.serve(0)
    try:
        assert m.url is not None
        text = fetch(m.url)
    finally:
        m.stop()
    assert "grpc_server_handled_total" in text and "secateur_params" in text
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, report
    assert report.strip() == "", report


# --------------------------------------------------------------------------- tests: units


def test_instances_have_their_own_registries() -> None:
    a, b = ServerMetrics(), ServerMetrics()
    a.job_submitted()
    a.job_submitted()
    b.job_submitted()
    assert value(parse(a.render()), "secateur_jobs_submitted_total") == 2
    assert value(parse(b.render()), "secateur_jobs_submitted_total") == 1
    registry = CollectorRegistry()
    c = ServerMetrics(registry)
    assert c.registry is registry
    c.job_submitted()
    assert registry.get_sample_value("secateur_jobs_submitted_total") == 1
    with pytest.raises(ValueError):  # the same names twice in one registry
        ServerMetrics(registry)


def test_job_completed_and_stage_validation() -> None:
    m = ServerMetrics()
    for outcome in OUTCOMES:
        m.job_completed(outcome, 1.0)
    with pytest.raises(ValueError, match="outcome"):
        m.job_completed("exploded", 1.0)
    with pytest.raises(ValueError):
        m.stage_finished("", 1.0)
    samples = parse(m.render())
    for outcome in OUTCOMES:
        assert value(samples, "secateur_jobs_completed_total", outcome=outcome) == 1
        assert value(samples, "secateur_job_duration_seconds_count", outcome=outcome) == 1
    job_les = [
        float(lab["le"]) for n, lab, _ in samples if n == "secateur_job_duration_seconds_bucket"
    ]
    assert max(x for x in job_les if x != float("inf")) >= 3600 * 8


def test_record_figures_sets_skips_and_replaces() -> None:
    m = ServerMetrics()
    full = {key: 10.0 for key in FIGURE_KEYS}
    m.record_figures(full, {**full, "params": 4.0, "accuracy": None})
    samples = parse(m.render())
    assert value(samples, "secateur_params", variant="original") == 10
    assert value(samples, "secateur_params", variant="pruned") == 4
    assert value(samples, "secateur_params_saved_ratio") == pytest.approx(0.6)
    assert value(samples, "secateur_accuracy", variant="original") == 10
    assert value(samples, "secateur_accuracy", variant="pruned") is None
    # The next job: no pruned figures at all (left alone), original without flops (removed).
    m.record_figures({**full, "flops": None, "params": 20.0}, None)
    samples = parse(m.render())
    assert value(samples, "secateur_flops", variant="original") is None
    assert value(samples, "secateur_params", variant="original") == 20
    assert value(samples, "secateur_params", variant="pruned") == 4
    assert value(samples, "secateur_params_saved_ratio") == pytest.approx(0.6)  # unchanged
    m.record_figures({"params": 0}, {"params": 0})  # no ratio from a zero original
    assert value(parse(m.render()), "secateur_params_saved_ratio") == pytest.approx(0.6)


def test_record_targets_replacesThePreviousTargetJob_skipsAbsoluteWanted() -> None:
    m = ServerMetrics()
    m.record_targets(
        [{"metric": "step_time", "wanted": 0.6, "predicted": 0.55, "measured": 0.58,
          "remeasured": 0.61, "met": True}]
    )  # fmt: skip
    samples = parse(m.render())
    assert value(samples, "secateur_target_fraction", metric="step_time", figure="measured") == 0.58
    assert value(samples, "secateur_target_met", metric="step_time") == 1
    m.record_targets(None)  # a ratio job leaves the last target job's series alone
    assert value(parse(m.render()), "secateur_target_met", metric="step_time") == 1
    m.record_targets(
        [{"metric": "params", "wanted": 5000, "wanted_absolute": True, "predicted": None,
          "measured": 0.4, "met": False}]
    )  # fmt: skip
    samples = parse(m.render())
    assert value(samples, "secateur_target_met", metric="step_time") is None
    assert value(samples, "secateur_target_fraction", metric="params", figure="wanted") is None
    assert value(samples, "secateur_target_fraction", metric="params", figure="measured") == 0.4
    assert value(samples, "secateur_target_met", metric="params") == 0


def test_build_info_is_replaced() -> None:
    m = ServerMetrics()
    m.set_build_info("0.1.0")
    m.set_build_info("0.2.0")
    infos = [(lab, v) for n, lab, v in parse(m.render()) if n == "secateur_build_info"]
    assert len(infos) == 1
    labels, one = infos[0]
    assert one == 1
    assert labels["version"] == "0.2.0"
    assert labels["grpc"] == grpc.__version__
    assert labels["python"].count(".") == 2


def test_serve_on_port_zero_and_stop() -> None:
    m = ServerMetrics()
    assert m.port is None and m.url is None
    port = m.serve(0)
    try:
        assert port > 0 and m.port == port
        assert m.url == f"http://127.0.0.1:{port}/metrics"
        m.job_submitted()
        assert "secateur_jobs_submitted_total 1.0" in fetch(m.url)
        with pytest.raises(RuntimeError):
            m.serve(0)
    finally:
        m.stop()
    m.stop()  # idempotent
    assert m.port is None
    with pytest.raises(urllib.error.URLError):
        fetch(f"http://127.0.0.1:{port}/metrics")
    # It can serve again after a stop.
    port2 = m.serve(0)
    try:
        assert "secateur_jobs_submitted_total 1.0" in fetch(f"http://127.0.0.1:{port2}/metrics")
    finally:
        m.stop()
