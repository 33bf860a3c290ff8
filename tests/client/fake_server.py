"""An in-memory ``PruningService`` for client and CLI tests (grpc and protobuf only).

A job advances one step through QUEUED, RUNNING (FETCHING .. EXPORTING) to
its outcome each time it is read (GetJob) or each message of a WatchJob
stream. Knobs (attributes of ``FakePruningService``, changeable between calls):

- ``outcome``: how new jobs end: ``succeeded``, ``gate`` (FAILED with
  FAILED_PRECONDITION, figures, nothing published), ``bad_input`` (FAILED with
  INVALID_ARGUMENT and a field violation), ``internal`` (FAILED, INTERNAL),
  ``cancelled`` (ends CANCELLED), ``hang`` (stays RUNNING until cancelled);
  ``outcome_by_model`` overrides it per model URI;
- ``token``: require ``authorization: Bearer <token>`` (else UNAUTHENTICATED);
- ``fail_next(n, method="*", code=UNAVAILABLE)``: the next n calls fail;
- ``reject``: field violations CreateJob answers INVALID_ARGUMENT with
  (a ratio outside [0, 1) or an empty URI is rejected in any case);
- ``delays``: method -> seconds to sleep before answering (deadline tests);
- ``watch_breaks``: that many WatchJob streams break with UNAVAILABLE after
  their first message;
- ``watch_interval``: seconds between stream messages.

``calls`` records (method, request, metadata) of every call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from secateur.v1 import enums, pruning_pb2, pruning_pb2_grpc

Job = pruning_pb2.Job
OUTCOMES = ("succeeded", "gate", "bad_input", "internal", "cancelled", "hang")
STAGES = [s for s in Job.Stage.values() if s != Job.STAGE_UNSPECIFIED]
TERMINAL = (Job.STATE_SUCCEEDED, Job.STATE_FAILED, Job.STATE_CANCELLED)


def bad_request(message: str, violations: list[tuple[str, str]]) -> grpc.Status:
    """An INVALID_ARGUMENT status carrying a google.rpc.BadRequest."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in violations
            ]
        )
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    return rpc_status.to_status(status)


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


def metrics(ratio: float) -> pruning_pb2.Metrics:
    keep = 1.0 - ratio
    m = pruning_pb2.Metrics(
        params=int(1_000_000 * keep * keep),
        weight_bytes=int(4_000_000 * keep * keep),
        flops=int(200_000_000 * keep * keep),
        peak_memory_bytes=int(64 * 2**20 * keep),
        train_step_seconds=0.1 * keep,
        train_step_p90_seconds=0.12 * keep,
        latency_batch1_seconds=0.002 * keep,
        latency_batch_seconds=0.05 * keep,
        accuracy=0.95 - 0.1 * ratio,
    )
    m.how.CopyFrom(
        _struct(
            {
                "device": "CPU (fake)",
                "batch_size": 128,
                "steps": 10,
                "warmup_steps": 2,
                "xla": False,
                "memory": "fake allocator",
            }
        )
    )
    return m


def result_for(spec: pruning_pb2.JobSpec, publish: bool) -> pruning_pb2.JobResult:
    ratios = list(spec.pruning.ratios) or [spec.pruning.ratio]
    result = pruning_pb2.JobResult(original=metrics(0.0))
    for r in ratios:
        c = result.candidates.add(ratio=r, metrics=metrics(r), accuracy_drop=0.1 * r)
        c.plan.CopyFrom(_struct({"spec": {"ratio": r, "round_to": 2}, "groups": [[0, 1, 3]]}))
    if publish:
        best = result.candidates[-1]
        result.pruned.CopyFrom(best.metrics)
        result.plan.CopyFrom(best.plan)
        result.selected_ratio = best.ratio
        result.output_uri = f"{spec.output_uri}/{spec.version or 1}"
        result.decision = "single ratio, no accuracy gate: published"
        result.outcome = pruning_pb2.JobResult.OUTCOME_PUBLISHED
    else:
        budget = spec.max_accuracy_drop if spec.HasField("max_accuracy_drop") else 0.0
        result.decision = f"no candidate within max_accuracy_drop={budget}; nothing published"
        result.outcome = pruning_pb2.JobResult.OUTCOME_GATE_FAILED
        result.max_accuracy_drop = budget
        best = result.candidates[0]
    result.best_ratio, result.best_accuracy_drop = best.ratio, best.accuracy_drop
    return result


@dataclass
class _Record:
    job: pruning_pb2.Job
    outcome: str
    step: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)


class FakePruningService(pruning_pb2_grpc.PruningServiceServicer):
    """See the module docstring for the knobs."""

    def __init__(self, outcome: str = "succeeded", *, token: str | None = None) -> None:
        assert outcome in OUTCOMES, outcome
        self.outcome = outcome
        self.outcome_by_model: dict[str, str] = {}
        self.token = token
        self.reject: list[tuple[str, str]] = []
        self.delays: dict[str, float] = {}
        self.watch_breaks = 0
        self.watch_interval = 0.0
        self.calls: list[tuple[str, Any, dict[str, str]]] = []
        self._failures: list[tuple[str, grpc.StatusCode]] = []
        self._records: dict[str, _Record] = {}
        self._order: list[str] = []
        self._by_request_id: dict[str, str] = {}
        self._lock = threading.RLock()
        self._next_id = 0

    # -- knobs and inspection ------------------------------------------------

    def fail_next(
        self, n: int, method: str = "*", code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    ) -> None:
        with self._lock:
            self._failures += [(method, code)] * n

    def count(self, method: str) -> int:
        return sum(1 for m, _, _ in self.calls if m == method)

    def job(self, name: str) -> pruning_pb2.Job:
        with self._lock:
            return self._copy(self._records[name].job)

    # -- machinery -----------------------------------------------------------

    @staticmethod
    def _copy(job: pruning_pb2.Job) -> pruning_pb2.Job:
        out = pruning_pb2.Job()
        out.CopyFrom(job)
        return out

    def _enter(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        metadata = {k: str(v) for k, v in context.invocation_metadata()}
        with self._lock:
            self.calls.append((method, request, metadata))
            failure = next(
                (i for i, (m, _) in enumerate(self._failures) if m in ("*", method)), None
            )
            code = self._failures.pop(failure)[1] if failure is not None else None
        if code is not None:
            context.abort(code, f"fake: {method} failed on purpose")
        if self.token is not None and metadata.get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")
        delay = self.delays.get(method, 0.0)
        if delay:
            time.sleep(delay)

    def _record(self, name: str, context: grpc.ServicerContext) -> _Record:
        with self._lock:
            record = self._records.get(name)
        if record is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job named {name!r}")
        assert record is not None
        return record

    def _advance(self, record: _Record) -> None:
        """One step along the job's timeline (nothing once it has ended)."""
        with record.changed:
            job = record.job
            if job.state in TERMINAL:
                return
            record.step += 1
            now = _now()
            job.update_time.CopyFrom(now)
            if record.step <= len(STAGES):
                if job.state == Job.STATE_QUEUED:
                    job.start_time.CopyFrom(now)
                    job.attempts = 1
                job.state = Job.STATE_RUNNING
                job.stage = STAGES[record.step - 1]
                job.progress = (record.step - 1) / len(STAGES)
                job.message = f"stage {enums.short_name(Job.Stage, job.stage).lower()}"
            elif record.outcome == "hang":
                job.progress = min(job.progress + 0.001, 0.99)
            else:
                self._end(record)
            record.changed.notify_all()

    def _end(self, record: _Record) -> None:
        job, outcome = record.job, record.outcome
        job.stage = Job.STAGE_UNSPECIFIED
        job.end_time.CopyFrom(_now())
        if outcome == "succeeded":
            job.state, job.progress, job.message = Job.STATE_SUCCEEDED, 1.0, "published"
            job.result.CopyFrom(result_for(job.spec, publish=True))
        elif outcome == "gate":
            job.state, job.message = Job.STATE_FAILED, "accuracy gate failed"
            job.result.CopyFrom(result_for(job.spec, publish=False))
            job.error.code = code_pb2.FAILED_PRECONDITION
            job.error.message = job.result.decision
        elif outcome == "bad_input":
            job.state = Job.STATE_FAILED
            detail = any_pb2.Any()
            detail.Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="spec.training.eval_data",
                            description="labels go up to 11 but the model has 10 classes",
                        )
                    ]
                )
            )
            job.error.CopyFrom(
                status_pb2.Status(
                    code=code_pb2.INVALID_ARGUMENT,
                    message="data does not fit the model",
                    details=[detail],
                )
            )
        elif outcome == "internal":
            job.state = Job.STATE_FAILED
            job.error.code, job.error.message = code_pb2.INTERNAL, "worker crashed"
        else:  # cancelled
            job.state = Job.STATE_CANCELLED
            job.error.code, job.error.message = code_pb2.CANCELLED, "cancelled by an operator"

    # -- the service ---------------------------------------------------------

    def CreateJob(
        self, request: pruning_pb2.CreateJobRequest, context: grpc.ServicerContext
    ) -> pruning_pb2.Job:
        self._enter("CreateJob", request, context)
        spec = request.spec
        violations = list(self.reject)
        ratios = list(spec.pruning.ratios) or [spec.pruning.ratio]
        for r in ratios:
            if not 0.0 <= r < 1.0:
                field_ = "spec.pruning.ratios" if spec.pruning.ratios else "spec.pruning.ratio"
                violations.append((field_, f"ratio must be in [0, 1). Received: ratio={r:g}"))
        for name in ("model_uri", "output_uri"):
            if not getattr(spec, name):
                violations.append((f"spec.{name}", "required"))
        if violations:
            context.abort_with_status(bad_request("invalid job spec", violations))
        if request.validate_only:
            return pruning_pb2.Job(spec=spec, state=Job.STATE_UNSPECIFIED)
        with self._lock:
            if request.request_id and request.request_id in self._by_request_id:
                return self._copy(self._records[self._by_request_id[request.request_id]].job)
            self._next_id += 1
            name = f"jobs/job{self._next_id:04d}"
            now = _now()
            job = pruning_pb2.Job(
                name=name,
                spec=spec,
                state=Job.STATE_QUEUED,
                create_time=now,
                update_time=now,
                request_id=request.request_id,
            )
            outcome = self.outcome_by_model.get(spec.model_uri, self.outcome)
            self._records[name] = _Record(job, outcome)
            self._order.append(name)
            if request.request_id:
                self._by_request_id[request.request_id] = name
            return self._copy(job)

    def GetJob(
        self, request: pruning_pb2.GetJobRequest, context: grpc.ServicerContext
    ) -> pruning_pb2.Job:
        self._enter("GetJob", request, context)
        record = self._record(request.name, context)
        self._advance(record)
        with record.changed:
            return self._copy(record.job)

    def ListJobs(
        self, request: pruning_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> pruning_pb2.ListJobsResponse:
        self._enter("ListJobs", request, context)
        try:
            start = int(request.page_token or "0")
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad page_token")
        size = request.page_size or 50
        with self._lock:
            jobs = [self._records[n].job for n in reversed(self._order)]
            if request.state:
                jobs = [j for j in jobs if j.state == request.state]
            page = [self._copy(j) for j in jobs[start : start + size]]
            more = start + size < len(jobs)
        return pruning_pb2.ListJobsResponse(
            jobs=page, next_page_token=str(start + size) if more else ""
        )

    def CancelJob(
        self, request: pruning_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> pruning_pb2.Job:
        self._enter("CancelJob", request, context)
        record = self._record(request.name, context)
        with record.changed:
            job = record.job
            if job.state not in TERMINAL:
                job.state, job.stage = Job.STATE_CANCELLED, Job.STAGE_UNSPECIFIED
                job.error.code, job.error.message = code_pb2.CANCELLED, "cancelled by request"
                job.end_time.CopyFrom(_now())
                job.update_time.CopyFrom(_now())
                record.changed.notify_all()
            return self._copy(job)

    def WatchJob(
        self, request: pruning_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pruning_pb2.Job]:
        self._enter("WatchJob", request, context)
        record = self._record(request.name, context)
        sent = 0
        last: pruning_pb2.Job | None = None
        while context.is_active():
            with record.changed:
                job = self._copy(record.job)
            if job != last:
                yield job
                last, sent = job, sent + 1
            if job.state in TERMINAL:
                return
            with self._lock:
                breaks = self.watch_breaks > 0 and sent == 1
                if breaks:
                    self.watch_breaks -= 1
            if breaks:
                context.abort(grpc.StatusCode.UNAVAILABLE, "fake: stream broken on purpose")
            if self.watch_interval:
                time.sleep(self.watch_interval)
            if record.outcome == "hang" and record.step > len(STAGES):
                with record.changed:  # wait for a cancel rather than spin
                    record.changed.wait(0.05)
            else:
                self._advance(record)

    def PlanPruning(
        self, request: pruning_pb2.PlanPruningRequest, context: grpc.ServicerContext
    ) -> pruning_pb2.PlanPruningResponse:
        self._enter("PlanPruning", request, context)
        ratio = request.pruning.ratio
        plan = json_format.ParseDict(
            {"spec": {"ratio": ratio}, "groups": [{"id": 0, "kept": [0, 2]}]}, struct_pb2.Struct()
        )
        return pruning_pb2.PlanPruningResponse(
            plan=plan,
            groups=[
                pruning_pb2.ChannelGroup(
                    id=0, origins=["conv1"], size_before=4, size_after=2, criterion="bn_scale"
                )
            ],
            params_before=1000,
            params_after=int(1000 * (1 - ratio) ** 2),
            flops_before=2000,
            flops_after=int(2000 * (1 - ratio) ** 2),
        )


def _now() -> Any:
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


class FakeServer:
    """A grpc.server on 127.0.0.1 (free port) serving a ``FakePruningService``."""

    def __init__(self, service: FakePruningService | None = None) -> None:
        self.service = service or FakePruningService()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=8))
        pruning_pb2_grpc.add_PruningServiceServicer_to_server(self.service, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
