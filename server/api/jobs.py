"""The domain layer of the service: durable jobs run in worker subprocesses.

``JobManager`` owns the store, the queue and the workers (``workers/spawn.py``). It
speaks domain objects: validated :class:`~secateur.server.jobstore.records.Submission` s
in, :class:`~secateur.server.jobstore.records.JobRecord` s out; the servicer converts
messages to and from them (``jobstore/jobs_pb.py``). Guarantees:

- a job is stored before CreateJob returns; the same ``request_id`` returns
  the same job;
- at most ``max_concurrent`` workers run; beyond ``max_queued`` waiting jobs
  CreateJob answers RESOURCE_EXHAUSTED;
- on start, jobs left RUNNING by a dead server are started again (their
  ``attempts`` grows) or, after ``max_attempts``, failed with the reason;
  QUEUED jobs are queued again — a restart never loses or strands a job;
- CancelJob stops a worker with SIGTERM (SIGKILL after a grace period);
  publication is the last step of a job and atomic, so a cancelled job
  leaves no output;
- each lifecycle event (created, started, stage change, recovered after a
  restart, cancel requested, finished) is one INFO line naming the job.

With a shared queue store (PostgreSQL: ``store.claim`` exists) the manager
is stateless: every read goes to the store (a serving replica's store keeps
a record cache that the change notifications keep fresh, server/jobstore/cache.py),
and never on the event loop: a cached record is answered at once, anything
else waits in a thread. Idempotency is the store's unique ``request_id``,
CancelJob asks the store (the owning worker stops the job at its next lease
renewal), WatchJob wakes on the store's change notifications and re-reads at
least every ``WATCH_POLL_S`` seconds anyway; jobs are run by
:class:`~secateur.server.workers.loop.WorkerLoop` s — one in this process
unless ``max_concurrent`` is 0 (an API-only replica).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from secateur.server.errors import ServiceError, echo, internal_error
from secateur.server.jobstore.interface import JobStore
from secateur.server.jobstore.page_tokens import Cursor, PageTokens
from secateur.server.jobstore.records import JobRecord, JobState, Submission, now_ns
from secateur.server.jobstore.writes import StoreWriter
from secateur.server.pipeline import convert
from secateur.server.pipeline.job_request import STAGES, JobRequest, overall_progress
from secateur.server.storage import Storage
from secateur.server.workers.lifecycle import ended, log_end, outcome_label, recovered
from secateur.server.workers.loop import (
    COUNTS_EVERY_S,
    LoopConfig,
    WorkerLoop,
    default_worker_id,
    publish_counts,
)
from secateur.server.workers.spawn import WorkerRunner, error_of

log = logging.getLogger("secateur.server")
#: A watcher on a shared store re-reads its job at least this often (notifications can be lost).
WATCH_POLL_S = 2.0
T = TypeVar("T")
#: A ListJobs page: its jobs and the token of the next page ("" after the last).
Page = tuple[list[JobRecord], str]


@dataclass(frozen=True)
class ManagerConfig:
    state_dir: str
    allowed_prefixes: tuple[str, ...] | None = None
    max_concurrent: int = 1
    max_queued: int = 100
    max_attempts: int = 3
    cancel_grace_s: float = 10.0
    #: Pauses between tries of a store write that failed (disk full, locked);
    #: after the last one the job fails (see jobstore.writes.StoreWriter).
    store_retry_delays: tuple[float, ...] = (0.1, 0.5, 2.0)
    #: The command a worker runs, ``--events-fd N`` appended (tests wrap it).
    worker_command: tuple[str, ...] = (sys.executable, "-m", "secateur.server.workers.job_process")
    #: A shared store's job lease (see workers.loop).
    lease_s: float = 30.0
    #: Installed packages whose registered classes model files may name (``--trust-package``).
    trusted_packages: tuple[str, ...] = ()
    #: PlanPruning and validate-only CreateJob calls (each a TensorFlow process) run at once here;
    #: beyond it RESOURCE_EXHAUSTED with ``plan_retry_s`` as RetryInfo (``--max-concurrent-plans``).
    max_concurrent_plans: int = 2
    plan_retry_s: float = 5.0


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

    def __init__(self, config: ManagerConfig, store: JobStore, metrics: Any = None) -> None:
        self.cfg = config
        self.store = store
        self.metrics = metrics
        self.storage = Storage(list(config.allowed_prefixes) if config.allowed_prefixes else None)
        self.runner = WorkerRunner(
            config.worker_command, config.state_dir, config.allowed_prefixes, config.cancel_grace_s,
            config.trusted_packages,
        )  # fmt: skip
        self.writes = StoreWriter(store, config.store_retry_delays)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._cancel_requested: set[str] = set()
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[Any]] = []
        self._running = 0
        self._closing = False
        secret = getattr(store, "secret", None)  # shared: any replica reads any one's tokens
        self._tokens = PageTokens(config.state_dir, secret("page-tokens") if secret else None)
        #: A shared queue store (PostgreSQL): see the module docstring.
        self.shared = callable(getattr(store, "claim", None))
        #: A job's record from the store's cache without I/O, or None (see jobstore.cache).
        self._cached: Callable[[str], JobRecord | None] = getattr(store, "cached", lambda _id: None)
        self.worker_loop: Any = None
        self._plans = 0  # PlanPruning / validate-only calls running now
        self._unsubscribe: Callable[[], None] | None = None

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        if self.shared:
            await self._start_shared()
            return
        for record in self.store.all():
            if record.state == JobState.RUNNING:
                self.store.save(recovered(record, self.cfg.max_attempts))
            current = self.store.get(record.id)
            if current is not None and current.state == JobState.QUEUED:
                self._queue.put_nowait(record.id)
        self._tasks = [asyncio.create_task(self._runner()) for _ in range(self.cfg.max_concurrent)]
        self._publish_queue_metrics()

    async def _start_shared(self) -> None:
        """Wake watchers on the store's notifications; run a worker loop unless API-only."""
        loop = asyncio.get_running_loop()
        subscribe = getattr(self.store, "subscribe", None)
        if subscribe is not None:
            wake = lambda _job: loop.call_soon_threadsafe(  # noqa: E731
                lambda: asyncio.ensure_future(self._notify())
            )
            self._unsubscribe = subscribe(wake)
        if self.metrics:
            self._tasks.append(asyncio.create_task(self._count_forever()))
        if self.cfg.max_concurrent > 0:
            cfg = LoopConfig(
                default_worker_id(),
                self.cfg.max_concurrent,
                self.cfg.lease_s,
                self.cfg.max_attempts,
            )
            self.worker_loop = WorkerLoop(cfg, self.store, self.runner, self.metrics)
            self._tasks.append(asyncio.create_task(self.worker_loop.run()))

    async def _count_forever(self) -> None:
        """Queue depth and running jobs from the store: every replica reports the same."""
        while True:
            await publish_counts(self.store, self.metrics)
            await asyncio.sleep(COUNTS_EVERY_S)

    async def shutdown(self) -> None:
        """Stop workers; their jobs stay RUNNING in the store and resume on restart."""
        self._closing = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.worker_loop is not None:
            self.worker_loop.stop()
            await asyncio.wait(self._tasks[-1:], timeout=40)
        for task in self._tasks:
            task.cancel()
        await self.runner.kill_all()
        self.writes.close()

    # -- queries -------------------------------------------------------------
    def get(self, name: str) -> JobRecord:
        record = self.store.get(job_id(name))
        if record is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no such job. Received: {echo(name)}")
        return record

    def list(
        self, state: JobState | None, page_size: int, page_token: str
    ) -> tuple[list[JobRecord], str]:
        """Jobs newest first; the token continues after the page's last job (see page_tokens)."""
        if page_size < 0:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size must be >= 0. Received: {page_size}",
                [("page_size", "must be >= 0")],
            )
        after = self._tokens.parse(page_token, state) if page_token else None
        records, last = self.store.page(state, after, min(page_size or 50, 1000))
        return records, self._tokens.issue(state, Cursor(*last)) if last is not None else ""

    async def get_async(self, name: str) -> JobRecord:
        """:meth:`get` that never blocks the event loop on a shared store: its
        cached record at once, else the database read in a thread."""
        if not self.shared:
            return self.get(name)  # the embedded store answers from memory
        hit = self._cached(job_id(name))
        return hit if hit is not None else await asyncio.to_thread(self.get, name)

    async def list_async(self, state: JobState | None, page_size: int, page_token: str) -> Page:
        """:meth:`list`, in a thread on a shared store."""
        return await self._off_loop(self.list, state, page_size, page_token)

    async def _off_loop(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in a thread on a shared store (database I/O), else here."""
        return await asyncio.to_thread(call, *args) if self.shared else call(*args)

    async def watch(self, name: str) -> AsyncIterator[JobRecord]:
        last = await self.get_async(name)
        yield last
        while self.shared and not last.state.terminal:
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), WATCH_POLL_S)
                except TimeoutError:
                    pass
            current = await self._reread(last)
            if current != last:
                last = current
                yield last
        while not last.state.terminal:
            async with self._changed:
                await self._changed.wait_for(_changed_from(self.store, last))
            last = self.store.get(last.id) or last
            yield last

    async def _reread(self, last: JobRecord) -> JobRecord:
        """A watched job read again from a shared store; as last seen while the store
        is away (PostgreSQL restarting), so the watch goes on and catches up after."""
        hit = self._cached(last.id)
        if hit is not None:
            return hit
        try:
            return await asyncio.to_thread(self.store.get, last.id) or last
        except Exception as exc:  # noqa: BLE001 - StoreUnavailableError and the like
            log.warning("job %s: reading it for a watcher failed (%s); retrying", last.id, exc)
            return last

    # -- commands ----------------------------------------------------------
    async def create(self, sub: Submission) -> JobRecord:
        """Queue a validated request (or only check it: ``validate_only``).

        The same ``request_id`` returns the job it made first.
        """
        if sub.request_id:
            existing = await self._off_loop(self.store.by_request_id, sub.request_id)
            if existing is not None:
                return existing
        await asyncio.to_thread(self._check_uris, sub.request)
        if sub.validate_only:
            await self.plan(sub.request.model_uri, sub.spec)  # model readable and supported
            return JobRecord(
                id="", spec=sub.spec, state=JobState.UNSPECIFIED, request_id=sub.request_id
            )
        if await self._queue_depth() >= self.cfg.max_queued:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the queue is full ({self.cfg.max_queued} jobs waiting); retry later",
            )
        if sub.request_id:
            twin = await self._off_loop(self.store.by_request_id, sub.request_id)
            if twin is not None:
                return twin  # a concurrent twin won the race
        now = now_ns()
        record = JobRecord(
            id=uuid.uuid4().hex[:16],
            spec=sub.spec,
            state=JobState.QUEUED,
            request_id=sub.request_id,
            create_ns=now,
            update_ns=now,
            message="queued",
        )
        if self.shared:
            twin = await asyncio.to_thread(self._insert_shared, record)
            if twin is not None:
                return twin  # a twin on another replica won the race
        else:
            self.store.insert(record)
        log.info(
            "job %s created: %s -> %s%s",
            record.id, sub.request.model_uri, sub.request.output_uri,
            f" (request_id {sub.request_id})" if sub.request_id else "",
        )  # fmt: skip
        if self.metrics:
            self.metrics.job_submitted()
        self._queue.put_nowait(record.id)
        self._publish_queue_metrics()
        await self._notify()
        return record

    async def _queue_depth(self) -> int:
        if not self.shared:
            return self._queue.qsize()
        counts = await asyncio.to_thread(self.store.counts)  # type: ignore[attr-defined]
        return int(counts.get(JobState.QUEUED, 0))

    def _insert_shared(self, record: JobRecord) -> JobRecord | None:
        """Insert into a shared store; the job that holds ``request_id`` already, if any."""
        try:
            self.store.insert(record)
        except Exception:
            twin = self.store.by_request_id(record.request_id) if record.request_id else None
            if twin is None:
                raise
            return twin
        if record.request_id:
            twin = self.store.by_request_id(record.request_id)
            if twin is not None and twin.id != record.id:
                return twin
        return None

    def _check_uris(self, request: JobRequest) -> None:
        """The pipeline's own pre-flight, before queueing: PERMISSION_DENIED,
        NOT_FOUND, ALREADY_EXISTS, or INVALID_ARGUMENT for an output inside the model."""
        from secateur.pruner.errors import InvalidSpecError
        from secateur.server.pipeline.boundary import preflight
        from secateur.server.storage import InvalidUriError

        try:
            preflight(self.storage, request)
        except (InvalidSpecError, InvalidUriError) as exc:
            raise convert.invalid(convert.field_path(exc.field), str(exc)) from exc

    async def cancel(self, name: str) -> JobRecord:
        record = await self.get_async(name)
        if record.state.terminal:
            return record
        log.info("job %s: cancel requested while %s", record.id, record.state.value)
        if self.shared:
            request_cancel = self.store.request_cancel  # type: ignore[attr-defined]
            done: JobRecord = await asyncio.to_thread(request_cancel, record.id)
            if self.metrics and done.state == JobState.CANCELLED:
                self.metrics.job_completed("cancelled", 0.0)
            await self._notify()
            return done
        self._cancel_requested.add(record.id)
        if record.state == JobState.QUEUED:
            err = ServiceError(grpc.StatusCode.CANCELLED, "cancelled while queued")
            await self._finish(record.id, JobState.CANCELLED, error=err)
            if self.metrics:
                self.metrics.job_completed("cancelled", 0.0)
        else:
            self.runner.stop(record.id)
        return self.store.get(record.id) or record

    async def plan(self, model_uri: str, spec: bytes) -> dict[str, Any]:
        """The dry-run plan of ``spec`` (a serialized JobSpec naming the model and pruning).

        At most ``max_concurrent_plans`` run at once; the worker process is
        killed when the call is cancelled or passes its deadline (WorkerRunner.run).

        Raises:
            StorageNotFoundError: no model at ``model_uri`` (the allow-list checked first).
            ServiceError: RESOURCE_EXHAUSTED (with RetryInfo) when the plans
                running here are at the limit; what the worker reports
                (unsupported model, ...).
        """
        if self._plans >= self.cfg.max_concurrent_plans:
            raise ServiceError(  # counted by grpc_server_handled_total{code=RESOURCE_EXHAUSTED}
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this replica is already planning {self._plans} models (its "
                f"--max-concurrent-plans); retry in {self.cfg.plan_retry_s:g} s",
                retry_after_s=self.cfg.plan_retry_s,
            )
        self._plans += 1
        try:
            return await self._plan(model_uri, spec)
        finally:
            self._plans -= 1

    async def _plan(self, model_uri: str, spec: bytes) -> dict[str, Any]:
        model = await asyncio.to_thread(self.storage.locate, model_uri, "model_uri")
        if not await asyncio.to_thread(self.storage.exists, model):  # allow-list first
            from secateur.server.storage import StorageNotFoundError

            raise StorageNotFoundError("the model must exist.", model.text)
        outcome, _ = await self.runner.run("plan", "plan-" + uuid.uuid4().hex[:8], spec)
        if outcome.get("type") == "plan":
            plan: dict[str, Any] = outcome["plan"]
            return plan
        raise error_of(outcome)

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
        record = self.store.get(jid)
        if record is None or record.state != JobState.QUEUED:
            return
        self._running += 1
        self._publish_queue_metrics()
        try:
            await self._run(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a store or reader failure fails the job
            err = internal_error(exc, f"job {jid}")
            current = self.store.get(jid)
            if current is not None and not current.state.terminal:  # not after it ended
                await self._finish(jid, JobState.FAILED, error=err)
                if self.metrics:
                    self.metrics.job_completed("failed", 0.0)
        finally:
            self._running -= 1
            self._publish_queue_metrics()

    async def _run(self, record: JobRecord) -> None:
        now = now_ns()
        record = record.evolve(
            state=JobState.RUNNING, attempts=record.attempts + 1, start_ns=now, message="starting"
        )
        await self.writes.save(record)
        log.info("job %s started (attempt %d)", record.id, record.attempts)
        await self._notify()
        started = time.monotonic()
        outcome, stage_times = await self.runner.run(
            "job", record.id, record.spec, lambda msg: self._progress(record.id, msg)
        )
        if self._closing:
            return  # left RUNNING on purpose: the next start resumes it
        if self.metrics:
            for stage, secs in stage_times.items():
                self.metrics.stage_finished(stage, secs)
        await self._conclude(record.id, outcome)
        if self.metrics:
            label = outcome_label(self.store.get(record.id))
            self.metrics.job_completed(label, time.monotonic() - started)

    async def _conclude(self, jid: str, outcome: dict[str, Any]) -> None:
        """End a job by its worker's outcome."""
        kind = outcome.get("type")
        if jid in self._cancel_requested and kind != "result":
            err = ServiceError(grpc.StatusCode.CANCELLED, "cancelled")
            await self._finish(jid, JobState.CANCELLED, error=err)
        elif kind == "result":
            await self._finish(jid, JobState.SUCCEEDED, report=outcome["report"])
        elif kind == "gate_failed":
            report = outcome["report"]
            err = ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"accuracy gate failed: {report.get('decision')}",
            )
            await self._finish(jid, JobState.FAILED, error=err, report=report)
        else:
            await self._finish(jid, JobState.FAILED, error=error_of(outcome))

    async def _progress(self, jid: str, msg: dict[str, Any]) -> None:
        old = self.store.get(jid)
        if old is None:
            return
        stage = msg["stage"] if msg["stage"] in STAGES else ""
        record = old.evolve(
            stage=stage,
            progress=overall_progress(msg["stage"], float(msg.get("progress") or 0.0)),
            message=f"{msg['stage'].lower()}: {msg.get('message', '')}".strip(),
        )
        durable = stage != old.stage
        await self.writes.save(record, durable=durable)
        if durable:
            log.info("job %s: stage %s", jid, stage or msg["stage"])
        await self._notify()

    async def _finish(
        self,
        jid: str,
        state: JobState,
        error: ServiceError | None = None,
        report: dict[str, Any] | None = None,
    ) -> None:
        old = self.store.get(jid)
        assert old is not None
        now = now_ns()
        if report is not None and self.metrics:
            self.metrics.record_figures(report.get("original"), report.get("pruned"))
        await self.writes.save_end(ended(old, state, error, report, now))
        log_end(old, state, error, report, now)
        self._cancel_requested.discard(jid)
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _publish_queue_metrics(self) -> None:
        if self.metrics and not self.shared:
            self.metrics.set_queue(self._queue.qsize(), self._running)


def _changed_from(store: JobStore, seen: JobRecord) -> Callable[[], bool]:
    return lambda: store.get(seen.id) is not seen
