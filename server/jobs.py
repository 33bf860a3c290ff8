"""The domain layer of the service: durable jobs run in worker subprocesses.

``JobManager`` owns the store, the queue and the workers. The servicer only
converts messages and calls it. Guarantees:

- a job is stored before CreateJob returns; the same ``request_id`` returns
  the same job;
- at most ``max_concurrent`` workers run; beyond ``max_queued`` waiting jobs
  CreateJob answers RESOURCE_EXHAUSTED;
- on start, jobs left RUNNING by a dead server are started again (their
  ``attempts`` grows) or, after ``max_attempts``, failed with the reason;
  QUEUED jobs are queued again — a restart never loses or strands a job;
- CancelJob stops a worker with SIGTERM (SIGKILL after a grace period);
  publication is the last step of a job and atomic, so a cancelled job
  leaves no output.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from secateur.server import convert
from secateur.server.errors import ServiceError, echo, internal_error, to_status_proto
from secateur.server.page_tokens import Cursor, PageTokens
from secateur.server.pipeline import JobRequest
from secateur.server.storage import Storage
from secateur.server.worker_pipes import (
    MAX_EVENT_LINE,
    WorkerOutput,
    incident_message,
    lines,
    new_incident,
    parse_event,
    reap,
)
from secateur.v1 import enums
from secateur.v1 import pruning_pb2 as pb

log = logging.getLogger("secateur.server")
Job = pb.Job
TERMINAL = {Job.STATE_SUCCEEDED, Job.STATE_FAILED, Job.STATE_CANCELLED}
OUTCOMES = {
    Job.STATE_SUCCEEDED: "succeeded",
    Job.STATE_FAILED: "failed",
    Job.STATE_CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class ManagerConfig:
    state_dir: str
    allowed_prefixes: tuple[str, ...] | None = None
    max_concurrent: int = 1
    max_queued: int = 100
    max_attempts: int = 3
    cancel_grace_s: float = 10.0
    #: Pauses between tries of a store write that failed (disk full, locked);
    #: after the last one the job fails (see JobManager._save).
    store_retry_delays: tuple[float, ...] = (0.1, 0.5, 2.0)
    #: The command a worker runs, ``--events-fd N`` appended (tests wrap it).
    worker_command: tuple[str, ...] = (sys.executable, "-m", "secateur.server.worker")


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def job_id(name: str) -> str:
    if not name.startswith("jobs/") or not name[5:] or "/" in name[5:]:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"a job name has the form jobs/{{id}}. Received: {echo(name)}",
            [("name", "must be jobs/{id}")],
        )
    return name[5:]


class JobManager:
    """Queue, run, watch and cancel jobs (see module docstring)."""

    def __init__(self, config: ManagerConfig, store: Any, metrics: Any = None) -> None:
        self.cfg = config
        self.store = store
        self.metrics = metrics
        self.storage = Storage(list(config.allowed_prefixes) if config.allowed_prefixes else None)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._cancel_requested: set[str] = set()
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[Any]] = []
        self._running = 0
        self._closing = False
        self._killers: set[asyncio.Task[None]] = set()
        self._tokens = PageTokens(config.state_dir)
        self._unsaved: set[str] = set()  # ended in memory, not yet in the store
        self._persister: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        for job in self.store.all():
            jid = job.name[5:]
            if job.state == Job.STATE_RUNNING:
                self._recover(jid, job)
            if self.store.get(jid).state == Job.STATE_QUEUED:
                self._queue.put_nowait(jid)
        self._tasks = [asyncio.create_task(self._runner()) for _ in range(self.cfg.max_concurrent)]
        self._publish_queue_metrics()

    def _recover(self, jid: str, job: Job) -> None:
        job = Job.FromString(job.SerializeToString())
        if job.attempts >= self.cfg.max_attempts:
            job.state = Job.STATE_FAILED
            job.end_time.CopyFrom(_now())
            err = ServiceError(
                grpc.StatusCode.ABORTED,
                f"the server stopped {job.attempts} times while this job was running; giving up",
            )
            job.error.CopyFrom(to_status_proto(err))
            job.message = err.message
        else:
            job.state = Job.STATE_QUEUED
            job.stage = Job.STAGE_UNSPECIFIED
            job.progress = 0.0
            job.message = "the server restarted during this job; it will run again"
        job.update_time.CopyFrom(_now())
        self.store.save(jid, job)

    async def shutdown(self) -> None:
        """Stop workers; their jobs stay RUNNING in the store and resume on restart."""
        self._closing = True
        for task in [*self._tasks, *([self._persister] if self._persister else [])]:
            task.cancel()
        for proc in list(self._procs.values()):
            if proc.returncode is None:
                proc.kill()
        for proc in list(self._procs.values()):
            await proc.wait()
        for jid in self._unsaved:  # a last try; a job still unsaved runs again on restart
            try:
                self.store.save(jid, self.store.get(jid))
            except Exception as exc:  # noqa: BLE001 - shutting down: log and go on
                log.error("job %s: its end could not be stored (%s)", jid, exc)

    # -- queries -------------------------------------------------------------
    def get(self, name: str) -> Job:
        job = self.store.get(job_id(name))
        if job is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no such job. Received: {echo(name)}")
        return job

    def list(self, state: int, page_size: int, page_token: str) -> tuple[list[Job], str]:
        """Jobs newest first; the token continues after the page's last job (see page_tokens)."""
        if page_size < 0:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size must be >= 0. Received: {page_size}",
                [("page_size", "must be >= 0")],
            )
        if state not in Job.State.values():  # proto3 enums accept any number on the wire
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"state must be one of {', '.join(Job.State.keys())}. Received: {state}",
                [("state", "not a Job.State")],
            )
        after = self._tokens.parse(page_token, state) if page_token else None
        jobs, last = self.store.page(state, after, min(page_size or 50, 1000))
        return jobs, self._tokens.issue(state, Cursor(*last)) if last is not None else ""

    async def watch(self, name: str) -> AsyncIterator[Job]:
        job = self.get(name)
        jid = job.name[5:]
        yield job
        last = job
        while last.state not in TERMINAL:
            async with self._changed:
                await self._changed.wait_for(_changed_from(self.store, jid, last))
            last = self.store.get(jid)
            yield last

    # -- commands ----------------------------------------------------------
    async def create(self, spec: pb.JobSpec, request_id: str, validate_only: bool) -> Job:
        if request_id:
            existing = self.store.by_request_id(request_id)
            if existing is not None:
                return existing
        request = convert.job_request(spec)  # INVALID_ARGUMENT with field violations
        await asyncio.to_thread(self._check_uris, request)
        if validate_only:
            await self.plan(spec.model_uri, spec.pruning)  # model readable and supported
            return Job(spec=spec, state=Job.STATE_UNSPECIFIED, request_id=request_id)
        if self._queue.qsize() >= self.cfg.max_queued:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the queue is full ({self.cfg.max_queued} jobs waiting); retry later",
            )
        if request_id and self.store.by_request_id(request_id) is not None:
            return self.store.by_request_id(request_id)  # a concurrent twin won the race
        jid = uuid.uuid4().hex[:16]
        now = _now()
        job = Job(
            name=f"jobs/{jid}",
            spec=spec,
            state=Job.STATE_QUEUED,
            request_id=request_id,
            create_time=now,
            update_time=now,
            message="queued",
        )
        self.store.insert(jid, job)
        if self.metrics:
            self.metrics.job_submitted()
        self._queue.put_nowait(jid)
        self._publish_queue_metrics()
        await self._notify()
        return job

    def _check_uris(self, request: JobRequest) -> None:
        """The pipeline's own pre-flight, before queueing: PERMISSION_DENIED,
        NOT_FOUND, ALREADY_EXISTS, or INVALID_ARGUMENT for an output inside the model."""
        from secateur.pruner.errors import InvalidSpecError
        from secateur.server.boundary import preflight

        try:
            preflight(self.storage, request)
        except InvalidSpecError as exc:
            raise convert.invalid(convert.field_path(exc.field), str(exc)) from exc

    async def cancel(self, name: str) -> Job:
        job = self.get(name)
        jid = job.name[5:]
        if job.state in TERMINAL:
            return job
        self._cancel_requested.add(jid)
        proc = self._procs.get(jid)
        if job.state == Job.STATE_QUEUED and proc is None:
            err = ServiceError(grpc.StatusCode.CANCELLED, "cancelled while queued")
            await self._finish(jid, Job.STATE_CANCELLED, error=err)
            if self.metrics:
                self.metrics.job_completed("cancelled", 0.0)
        elif proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            self._killers.add(task := asyncio.create_task(self._kill_later(proc)))
            task.add_done_callback(self._killers.discard)
        return self.store.get(jid)

    async def _kill_later(self, proc: asyncio.subprocess.Process) -> None:
        try:
            await asyncio.wait_for(proc.wait(), self.cfg.cancel_grace_s)
        except TimeoutError:
            proc.kill()

    async def plan(self, model_uri: str, pruning: pb.PruningSpec) -> pb.PlanPruningResponse:
        from secateur.pruner.errors import InvalidSpecError

        if not model_uri.strip():
            raise convert.invalid("model_uri", "model_uri is required. Received: an empty string")
        try:
            convert.prune_spec(pruning)
        except InvalidSpecError as exc:
            path = convert.field_path(exc.field).removeprefix("spec.")
            raise convert.invalid(path, str(exc)) from exc
        spec = pb.JobSpec(model_uri=model_uri, pruning=pruning)
        if not await asyncio.to_thread(self.storage.exists, model_uri):  # allow-list first
            from secateur.server.storage import StorageNotFoundError

            raise StorageNotFoundError("the model must exist.", model_uri)
        outcome, _ = await self._spawn("plan", "plan-" + uuid.uuid4().hex[:8], spec)
        if outcome.get("type") == "plan":
            return convert.plan_response(outcome["plan"])
        raise _error_of(outcome)

    # -- running -------------------------------------------------------------
    async def _runner(self) -> None:
        """Run queued jobs one at a time; nothing one job does stops this loop."""
        while not self._closing:
            jid = await self._queue.get()
            try:
                await self._run_queued(jid)
            except asyncio.CancelledError:
                raise
            except Exception:  # the runner must outlive any one job
                log.exception("the runner could not finish job %s; taking the next one", jid)

    async def _run_queued(self, jid: str) -> None:
        job = self.store.get(jid)
        if job is None or job.state != Job.STATE_QUEUED:
            return
        self._running += 1
        self._publish_queue_metrics()
        try:
            await self._run(jid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a store or reader failure fails the job
            err = internal_error(exc, f"job {jid}")
            if self.store.get(jid).state not in TERMINAL:  # not after it ended
                await self._finish(jid, Job.STATE_FAILED, error=err)
                if self.metrics:
                    self.metrics.job_completed("failed", 0.0)
        finally:
            self._running -= 1
            self._publish_queue_metrics()

    async def _run(self, jid: str) -> None:
        job = Job.FromString(self.store.get(jid).SerializeToString())
        job.state = Job.STATE_RUNNING
        job.attempts += 1
        job.start_time.CopyFrom(_now())
        job.update_time.CopyFrom(job.start_time)
        job.message = "starting"
        await self._save(jid, job)
        await self._notify()
        started = time.monotonic()
        outcome, stage_times = await self._spawn("job", jid, job.spec)
        if self._closing:
            return  # left RUNNING on purpose: the next start resumes it
        if self.metrics:
            for stage, secs in stage_times.items():
                self.metrics.stage_finished(stage, secs)
        kind = outcome.get("type")
        if jid in self._cancel_requested and kind != "result":
            await self._finish(
                jid, Job.STATE_CANCELLED, error=ServiceError(grpc.StatusCode.CANCELLED, "cancelled")
            )
        elif kind == "result":
            await self._finish(jid, Job.STATE_SUCCEEDED, report=outcome["report"])
        elif kind == "gate_failed":
            report = outcome["report"]
            err = ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"accuracy gate failed: {report.get('decision')}",
            )
            await self._finish(jid, Job.STATE_FAILED, error=err, report=report)
        else:
            await self._finish(jid, Job.STATE_FAILED, error=_error_of(outcome))
        if self.metrics:
            final = self.store.get(jid)
            self.metrics.job_completed(_outcome_label(final, outcome), time.monotonic() - started)

    async def _spawn(
        self, mode: str, key: str, spec: pb.JobSpec
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Run a worker; stream its events into the job; return its outcome.

        If reading it fails (a store write, a reader), the worker is killed
        and reaped before the error propagates: no job waits on a worker
        that nobody reads any more.
        """
        work = os.path.join(self.cfg.state_dir, "work", key)
        os.makedirs(work, exist_ok=True)
        read_fd, write_fd = os.pipe()
        payload = {
            "mode": mode,
            "spec": base64.b64encode(spec.SerializeToString()).decode(),
            "allowed": list(self.cfg.allowed_prefixes or []),
        }
        env = os.environ | {"TMPDIR": work, "TF_CPU_ALLOCATOR_USE_BFC": "true"}
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.cfg.worker_command, "--events-fd", str(write_fd),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, pass_fds=(write_fd,), env=env,
            )  # fmt: skip
        except BaseException:
            os.close(read_fd)
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            os.close(write_fd)
        if mode == "job":
            self._procs[key] = proc
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(payload).encode())
        proc.stdin.close()
        output = WorkerOutput(key)
        logs = asyncio.create_task(output.drain(proc.stdout))
        stage_times: dict[str, float] = {}
        try:
            outcome = await self._read_events(read_fd, key, mode == "job", stage_times)
            await reap(proc, logs)
        except Exception:
            if proc.returncode is None:
                proc.kill()
            await reap(proc, logs)
            raise
        finally:
            self._procs.pop(key, None)
            shutil.rmtree(work, ignore_errors=True)
        return self._checked(key, outcome, proc.returncode, output), stage_times

    def _checked(
        self, key: str, outcome: dict[str, Any], returncode: int | None, output: WorkerOutput
    ) -> dict[str, Any]:
        """The worker's outcome; an internal failure is logged with an incident id.

        The log entry carries the worker's last output lines (its traceback),
        the outcome's message the same incident id.
        """
        if outcome.get("type") != "error" and outcome:
            return outcome
        if outcome and outcome.get("code") != "INTERNAL":
            return outcome
        how = f"signal {-returncode}" if returncode and returncode < 0 else f"code {returncode}"
        if not outcome and key in self._cancel_requested:
            return {"type": "error", "code": "CANCELLED", "message": f"cancelled ({how})"}
        incident = str(outcome.get("incident") or new_incident())
        if not outcome or not outcome.get("incident"):
            what = outcome.get("message") or f"the worker exited with {how} and no outcome"
            outcome = {"type": "error", "code": "INTERNAL", "incident": incident,
                       "message": incident_message(what, incident)}  # fmt: skip
        log.error(
            "worker %s failed: %s (incident %s, exit %s); its last output:\n%s",
            key, outcome["message"], incident, how, output.tail_text(),
        )  # fmt: skip
        return outcome

    async def _read_events(
        self, fd: int, key: str, is_job: bool, stage_times: dict[str, float]
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb")
        )
        outcome: dict[str, Any] = {}
        stage, stage_start = "", time.monotonic()
        try:
            async for raw, dropped in lines(reader, MAX_EVENT_LINE):
                msg = parse_event(raw, dropped, key)
                if msg is None:
                    continue
                if msg.get("type") != "event":
                    outcome = msg
                    continue
                if msg["stage"] != stage:
                    if stage:
                        stage_times[stage] = (
                            stage_times.get(stage, 0.0) + time.monotonic() - stage_start
                        )
                    stage, stage_start = msg["stage"], time.monotonic()
                if is_job:
                    await self._progress(key, msg)
        finally:
            transport.close()
        if stage:
            stage_times[stage] = stage_times.get(stage, 0.0) + time.monotonic() - stage_start
        return outcome

    async def _progress(self, jid: str, msg: dict[str, Any]) -> None:
        old = self.store.get(jid)
        job = Job.FromString(old.SerializeToString())
        stage = enums.stage_number(msg["stage"])
        durable = stage != old.stage
        job.stage = stage
        job.progress = _overall(msg["stage"], float(msg.get("progress") or 0.0))
        job.message = f"{msg['stage'].lower()}: {msg.get('message', '')}".strip()
        job.update_time.CopyFrom(_now())
        await self._save(jid, job, durable=durable)
        await self._notify()

    async def _finish(
        self,
        jid: str,
        state: int,
        error: ServiceError | None = None,
        report: dict[str, Any] | None = None,
    ) -> None:
        job = Job.FromString(self.store.get(jid).SerializeToString())
        job.state = state
        job.end_time.CopyFrom(_now())
        job.update_time.CopyFrom(job.end_time)
        if state == Job.STATE_SUCCEEDED:
            job.progress = 1.0
            job.stage = Job.STAGE_UNSPECIFIED
        if error is not None:
            job.error.CopyFrom(to_status_proto(error))
            job.message = error.message
        if report is not None:
            job.result.CopyFrom(convert.job_result(report))
            job.message = report.get("decision") or job.message
            if self.metrics:
                self.metrics.record_figures(report.get("original"), report.get("pruned"))
        await self._save_end(jid, job)
        self._cancel_requested.discard(jid)
        await self._notify()

    async def _save(self, jid: str, job: Job, durable: bool = True) -> None:
        """``store.save``, tried again after each of ``store_retry_delays``; then raises.

        The store changes memory only once the database took the write, so a
        failure here leaves the two in agreement.
        """
        for delay in (*self.cfg.store_retry_delays, None):
            try:
                self.store.save(jid, job, durable=durable)
                return
            except Exception as exc:  # disk full, locked, I/O error
                if delay is None:
                    raise
                log.warning("storing job %s failed (%s); retrying in %.1f s", jid, exc, delay)
                await asyncio.sleep(delay)

    async def _save_end(self, jid: str, job: Job) -> None:
        """Store a job's end; never raises.

        When the store stays unwritable, the job ends in memory anyway (its
        watchers return, its slot frees) and a background task writes it as
        soon as the store takes writes again.
        """
        try:
            await self._save(jid, job)
            return
        except Exception as exc:  # see docstring
            log.error(
                "job %s ended %s but the store refused the write (incident %s); "
                "retrying in the background",
                jid, Job.State.Name(job.state), new_incident(), exc_info=exc,
            )  # fmt: skip
        self.store.save(jid, job, durable=False)
        self._unsaved.add(jid)
        if self._persister is None or self._persister.done():
            self._persister = asyncio.create_task(self._persist_unsaved())

    async def _persist_unsaved(self) -> None:
        delay = max(self.cfg.store_retry_delays, default=1.0)
        while self._unsaved:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)
            for jid in list(self._unsaved):
                try:
                    self.store.save(jid, self.store.get(jid))
                except Exception as exc:  # noqa: BLE001 - still unwritable: later
                    log.warning("storing the end of job %s failed again (%s)", jid, exc)
                else:
                    self._unsaved.discard(jid)
                    log.info("job %s: its end is stored now", jid)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _publish_queue_metrics(self) -> None:
        if self.metrics:
            self.metrics.set_queue(self._queue.qsize(), self._running)


def _changed_from(store: Any, jid: str, seen: Job) -> Callable[[], bool]:
    return lambda: store.get(jid) is not seen


def _overall(stage: str, within: float) -> float:
    # One formula for the service and `secateur prune`: monotone across a sweep.
    from secateur.server.pipeline import overall_progress

    return overall_progress(stage, within)


def _outcome_label(job: Job, outcome: dict[str, Any]) -> str:
    if outcome.get("type") == "gate_failed" and job.state == Job.STATE_FAILED:
        return "gate_failed"
    return OUTCOMES.get(job.state, "failed")


def _error_of(outcome: dict[str, Any]) -> ServiceError:
    code_name = outcome.get("code", "INTERNAL")
    code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.INTERNAL)
    violations = [tuple(v) for v in outcome.get("violations") or []]
    return ServiceError(code, outcome.get("message") or "worker failed", violations)  # type: ignore[arg-type]
