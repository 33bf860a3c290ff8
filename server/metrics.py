"""Prometheus metrics of the service: every metric is declared here.

:class:`ServerMetrics` owns one :class:`prometheus_client.CollectorRegistry`
(a new one per instance unless one is given, so several servers can live in
one process) and serves it on its own HTTP port (``/metrics``).
:class:`MetricsInterceptor` (in :mod:`secateur.server.api.metrics_interceptor`,
re-exported here) is a ``grpc.aio`` server interceptor that feeds the
standard gRPC server metrics, with the names and label names of
go-grpc-prometheus:

- ``grpc_server_started_total{grpc_type,grpc_service,grpc_method}``
- ``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}``
- ``grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}`` (histogram)
- ``grpc_server_msg_received_total`` / ``grpc_server_msg_sent_total``

``grpc_type`` is unary, client_stream, server_stream or bidi_stream;
``grpc_code`` is the Python ``grpc.StatusCode`` name (``OK``, ``NOT_FOUND``).

Domain metrics keep small label sets and never carry job ids: counts of jobs
submitted and completed by ``outcome``, the queue, stage and job durations
(buckets up to hours) and the measured figures of the last finished job by
``variant`` (original|pruned); for the last finished target job,
``secateur_target_fraction{metric,figure}`` (figure: wanted, predicted,
measured, remeasured; fractions of the original) and ``secateur_target_met{metric}``.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from secateur.v1 import enums

__all__ = [
    "FIGURE_KEYS",
    "GRPC_TYPES",
    "JOB_DURATION_BUCKETS",
    "OUTCOMES",
    "STAGE_DURATION_BUCKETS",
    "VARIANTS",
    "ServerMetrics",
]

OUTCOMES: tuple[str, ...] = ("succeeded", "failed", "cancelled", "gate_failed")
# The job stages, from the contract without their prefix (the pipeline's STAGES).
JOB_STAGES: tuple[str, ...] = enums.STAGES
VARIANTS: tuple[str, ...] = ("original", "pruned")
GRPC_TYPES: tuple[str, ...] = ("unary", "client_stream", "server_stream", "bidi_stream")


def rpc_type(request_streaming: bool, response_streaming: bool) -> str:
    """The ``grpc_type`` label of a method: unary, client_stream, server_stream or bidi_stream."""
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


#: Keys of the figure mappings given to :meth:`ServerMetrics.record_figures`.
FIGURE_KEYS: tuple[str, ...] = (
    "params",
    "weight_bytes",
    "flops",
    "peak_memory_bytes",
    "train_step_seconds",
    "accuracy",
)
STAGE_DURATION_BUCKETS: tuple[float, ...] = (
    0.1,
    0.5,
    1,
    5,
    15,
    30,
    60,
    120,
    300,
    600,
    1200,
    1800,
    3600,
    7200,
    14400,
    28800,
)
JOB_DURATION_BUCKETS: tuple[float, ...] = (
    1,
    5,
    15,
    30,
    60,
    120,
    300,
    600,
    1200,
    1800,
    3600,
    7200,
    14400,
    28800,
    57600,
    86400,
)
_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")


class ServerMetrics:
    """All metrics of one server, in one registry, with a ``/metrics`` endpoint."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry: CollectorRegistry = (
            registry if registry is not None else CollectorRegistry(auto_describe=True)
        )
        r = self.registry
        # gRPC server metrics (go-grpc-prometheus names and label names).
        self.grpc_started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            _GRPC_LABELS,
            registry=r,
        )
        self.grpc_handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*_GRPC_LABELS, "grpc_code"),
            registry=r,
        )
        self.grpc_handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            _GRPC_LABELS,
            registry=r,
        )
        self.grpc_msg_received = Counter(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            _GRPC_LABELS,
            registry=r,
        )
        self.grpc_msg_sent = Counter(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            _GRPC_LABELS,
            registry=r,
        )
        # Jobs.
        self.jobs_submitted = Counter(
            "secateur_jobs_submitted_total", "Jobs accepted by the server.", registry=r
        )
        self.jobs_completed = Counter(
            "secateur_jobs_completed_total",
            "Jobs that reached a terminal state, by outcome "
            "(succeeded, failed, cancelled, gate_failed).",
            ("outcome",),
            registry=r,
        )
        for outcome in OUTCOMES:
            self.jobs_completed.labels(outcome=outcome)
        self.jobs_queued = Gauge("secateur_jobs_queued", "Jobs waiting for a worker.", registry=r)
        self.jobs_running = Gauge(
            "secateur_jobs_running", "Jobs currently running in a worker.", registry=r
        )
        self.stage_duration = Histogram(
            "secateur_stage_duration_seconds",
            "Wall time of one job stage (FETCHING ... EXPORTING), in seconds.",
            ("stage",),
            buckets=STAGE_DURATION_BUCKETS,
            registry=r,
        )
        self.job_duration = Histogram(
            "secateur_job_duration_seconds",
            "Wall time of a job from start to terminal state, in seconds, by outcome.",
            ("outcome",),
            buckets=JOB_DURATION_BUCKETS,
            registry=r,
        )
        # Zero series from the start, so the first job after a restart shows in
        # rate() and histogram_quantile() (a series' first sample is invisible).
        for stage in JOB_STAGES:
            self.stage_duration.labels(stage=stage)
        for outcome in OUTCOMES:
            self.job_duration.labels(outcome=outcome)
        # Figures of the last finished job, by variant (original|pruned).
        self.train_step_seconds = Gauge(
            "secateur_train_step_seconds",
            "Median training step time of the last finished job, in seconds, by variant.",
            ("variant",),
            registry=r,
        )
        self.peak_memory_bytes = Gauge(
            "secateur_peak_memory_bytes",
            "Peak training memory of the last finished job, in bytes, by variant.",
            ("variant",),
            registry=r,
        )
        self.params = Gauge(
            "secateur_params",
            "Parameter count of the last finished job's model, by variant.",
            ("variant",),
            registry=r,
        )
        self.flops = Gauge(
            "secateur_flops",
            "FLOPs of one forward pass (one example) of the last finished job's model, by variant.",
            ("variant",),
            registry=r,
        )
        self.weight_bytes = Gauge(
            "secateur_weight_bytes",
            "Size of the weights of the last finished job's model, in bytes, by variant.",
            ("variant",),
            registry=r,
        )
        self.accuracy = Gauge(
            "secateur_accuracy",
            "Evaluation accuracy of the last finished job's model (0..1), by variant.",
            ("variant",),
            registry=r,
        )
        self.params_saved_ratio = Gauge(
            "secateur_params_saved_ratio",
            "1 - pruned/original parameter count of the last finished job.",
            registry=r,
        )
        self.target_fraction = Gauge(
            "secateur_target_fraction",
            "A target of the last finished target job as a fraction of the original's figure, "
            "by metric (step_time, latency, peak_memory, params, flops) and figure (wanted, "
            "predicted by the cost model, measured by the planner, remeasured after fine-tuning).",
            ("metric", "figure"),
            registry=r,
        )
        self.target_met = Gauge(
            "secateur_target_met",
            "1 when the last finished target job met the target, 0 otherwise, by metric.",
            ("metric",),
            registry=r,
        )
        self.build_info = Gauge(
            "secateur_build_info",
            "Build information of the server (always 1).",
            ("version", "python", "grpc"),
            registry=r,
        )
        self._figures: dict[str, Gauge] = {
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "flops": self.flops,
            "peak_memory_bytes": self.peak_memory_bytes,
            "train_step_seconds": self.train_step_seconds,
            "accuracy": self.accuracy,
        }
        self._lock = threading.Lock()
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._host = "127.0.0.1"

    # ------------------------------------------------------------------ gRPC

    def init_service(self, service: Any) -> None:
        """Create the zero series of every method of a protobuf ServiceDescriptor.

        As go-grpc-prometheus' ``Register``: started, handled (for every code)
        and the handling histogram exist from the start, so ``rate()`` and
        ``increase()`` see the first call.
        """
        for method in service.methods:
            kind = rpc_type(bool(method.client_streaming), bool(method.server_streaming))
            labels = (kind, str(service.full_name), str(method.name))
            self.grpc_started.labels(*labels)
            self.grpc_handling_seconds.labels(*labels)
            self.grpc_msg_received.labels(*labels)
            self.grpc_msg_sent.labels(*labels)
            for code in grpc.StatusCode:
                self.grpc_handled.labels(*labels, code.name)

    # ------------------------------------------------------------------ jobs

    def job_submitted(self) -> None:
        """Count one job accepted by the server."""
        self.jobs_submitted.inc()

    def job_completed(self, outcome: str, duration_s: float) -> None:
        """Count a job that reached a terminal state and observe its duration.

        ``outcome`` is one of :data:`OUTCOMES`; anything else is a ValueError
        (label values stay a small, known set).
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown job outcome {outcome!r}; expected one of {OUTCOMES}")
        self.jobs_completed.labels(outcome=outcome).inc()
        self.job_duration.labels(outcome=outcome).observe(max(0.0, float(duration_s)))

    def set_queue(self, queued: int, running: int) -> None:
        """Set the numbers of queued and running jobs."""
        self.jobs_queued.set(queued)
        self.jobs_running.set(running)

    def stage_finished(self, stage: str, seconds: float) -> None:
        """Observe the wall time of one stage (e.g. ``FINE_TUNING``)."""
        if not stage:
            raise ValueError("stage must not be empty")
        self.stage_duration.labels(stage=stage).observe(max(0.0, float(seconds)))

    def record_figures(
        self, original: Mapping[str, Any] | None, pruned: Mapping[str, Any] | None
    ) -> None:
        """Publish the measured figures of the last finished job.

        Each mapping has the keys of :data:`FIGURE_KEYS` (extra keys are
        ignored). A ``None`` mapping leaves that variant's series as they were;
        within a given mapping a missing or ``None`` figure removes that
        series, so nothing from an earlier job is reported as this job's.
        ``secateur_params_saved_ratio`` is set when both parameter counts are
        known and the original one is positive.
        """
        with self._lock:
            for variant, figures in (("original", original), ("pruned", pruned)):
                if figures is None:
                    continue
                for key, gauge in self._figures.items():
                    value = figures.get(key)
                    if value is None:
                        try:
                            gauge.remove(variant)
                        except KeyError:
                            pass
                    else:
                        gauge.labels(variant=variant).set(float(value))
            if original is not None and pruned is not None:
                before, after = original.get("params"), pruned.get("params")
                if before is not None and after is not None and float(before) > 0:
                    self.params_saved_ratio.set(1.0 - float(after) / float(before))

    def record_targets(self, targets: list[Mapping[str, Any]] | None) -> None:
        """Publish the targets of the last finished target job (None or []: left as they were).

        Every series of the previous target job is removed first; an absolute
        wanted limit (``wanted_absolute``) and figures not known are not set.
        """
        if not targets:
            return
        with self._lock:
            self.target_fraction.clear()
            self.target_met.clear()
            for t in targets:
                metric = str(t["metric"])
                for figure in ("wanted", "predicted", "measured", "remeasured"):
                    value = t.get(figure)
                    if value is None or (figure == "wanted" and t.get("wanted_absolute")):
                        continue
                    self.target_fraction.labels(metric=metric, figure=figure).set(float(value))
                self.target_met.labels(metric=metric).set(1.0 if t.get("met") else 0.0)

    def set_build_info(self, version: str) -> None:
        """Set ``secateur_build_info{version,python,grpc} 1`` (replacing any earlier one)."""
        with self._lock:
            self.build_info.clear()
            self.build_info.labels(
                version=version, python=platform.python_version(), grpc=grpc.__version__
            ).set(1)

    # ------------------------------------------------------------------ exposition

    def render(self) -> str:
        """The registry in the Prometheus text format (what ``/metrics`` serves)."""
        return prometheus_client.generate_latest(self.registry).decode("utf-8")

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP in a daemon thread; return the bound port.

        ``port=0`` binds a free port. Raises RuntimeError when already serving.
        """
        with self._lock:
            if self._httpd is not None:
                raise RuntimeError("metrics endpoint already serving")
            httpd, thread = prometheus_client.start_http_server(
                port, addr=host, registry=self.registry
            )
            self._httpd, self._thread, self._host = httpd, thread, host
            return int(httpd.server_port)

    @property
    def port(self) -> int | None:
        """The bound port while serving, else None."""
        httpd = self._httpd
        return int(httpd.server_port) if httpd is not None else None

    @property
    def url(self) -> str | None:
        """``http://HOST:PORT/metrics`` while serving, else None."""
        port = self.port
        if port is None:
            return None
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{port}/metrics"

    def stop(self) -> None:
        """Stop the HTTP endpoint (no-op when not serving)."""
        with self._lock:
            httpd, thread = self._httpd, self._thread
            self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
