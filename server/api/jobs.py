"""The domain layer of the service: durable jobs, run by the worker loop.

``JobManager`` speaks domain objects: validated
:class:`~secateur.server.jobstore.records.Submission` s in,
:class:`~secateur.server.jobstore.records.JobRecord` s out; the servicer converts
messages to and from them (``jobstore/jobs_pb.py``). Jobs are run by one
:class:`~secateur.server.workers.loop.WorkerLoop` in this process (unless
``max_concurrent`` is 0: an API-only replica), whichever the store: the
embedded SQLite store and PostgreSQL both lease jobs to it, so there is one
claim, progress, fence, conclude and cancel path. Guarantees:

- a job is stored before CreateJob returns; the same ``request_id`` returns
  the same job (the store's unique ``request_id``);
- at most ``max_concurrent`` jobs run here; beyond ``max_queued`` waiting
  jobs CreateJob answers RESOURCE_EXHAUSTED;
- a restart never loses or strands a job: the embedded store's leases die
  with the process, so on start a job it left RUNNING is queued again (its
  ``attempts`` grows) or, after ``max_attempts``, failed with the reason;
  on a shared store an expired lease makes the job claimable again;
- CancelJob asks the store: a QUEUED job ends at once, a RUNNING one is
  stopped by its worker at the next lease renewal; publication is fenced
  and the last step of a job, so a cancelled job leaves no output;
- WatchJob wakes on the store's change notifications and re-reads at least
  every ``WATCH_POLL_S`` seconds anyway.

Reads of the embedded store are answered from its memory; on a shared store
they never block the event loop (a serving replica's record cache answers
at once, server/jobstore/cache.py, anything else waits in a thread).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from secateur.server.api.tenants import NO_TENANT, Tenant
from secateur.server.errors import ServiceError, echo
from secateur.server.jobstore.interface import QueueStore
from secateur.server.jobstore.page_tokens import Cursor, PageTokens
from secateur.server.jobstore.records import JobRecord, JobState, Submission, now_ns
from secateur.server.pipeline import convert
from secateur.server.pipeline.checkpoint import discard
from secateur.server.pipeline.job_request import JobRequest
from secateur.server.storage import Storage
from secateur.server.workers.lifecycle import recovered
from secateur.server.workers.loop import (
    COUNTS_EVERY_S,
    LoopConfig,
    WorkerLoop,
    default_worker_id,
    end_line,
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
    #: The command a worker runs, ``--events-fd N`` appended (tests wrap it).
    worker_command: tuple[str, ...] = (sys.executable, "-m", "secateur.server.workers.job_process")
    #: A job's lease (see workers.loop); the embedded store's too.
    lease_s: float = 30.0
    #: Installed packages whose registered classes model files may name (``--trust-package``).
    trusted_packages: tuple[str, ...] = ()
    #: PlanPruning and validate-only CreateJob calls (each a TensorFlow process) run at once here;
    #: beyond it RESOURCE_EXHAUSTED with ``plan_retry_s`` as RetryInfo (``--max-concurrent-plans``).
    max_concurrent_plans: int = 2
    plan_retry_s: float = 5.0
    #: A job's (and plan's) model download stops past this many bytes (``--max-model-bytes``).
    max_model_bytes: int | None = None
    #: A job run's wall-time limit and the most ``max_run_seconds`` may ask (``--max-job-seconds``).
    max_job_seconds: float | None = None


def _same_tenant(record: JobRecord, tenant: Tenant) -> JobRecord:
    """The job a ``request_id`` already made, if it is ``tenant``'s; ALREADY_EXISTS if
    another tenant's (its job stays unseen: only the id is known to be taken)."""
    if record.tenant != tenant.name:
        raise ServiceError(
            grpc.StatusCode.ALREADY_EXISTS,
            "this request_id is taken by a job you cannot see; use a fresh request_id",
            [("request_id", "taken")],
        )
    return record


def _owned(record: JobRecord | None, name: str, tenant: str | None) -> JobRecord:
    """``record`` if it exists and is ``tenant``'s (None: anyone's); else NOT_FOUND,
    the same answer for another tenant's job as for no job at all."""
    if record is None or (tenant is not None and record.tenant != tenant):
        raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no such job. Received: {echo(name)}")
    return record


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

    def __init__(self, config: ManagerConfig, store: QueueStore, metrics: Any = None) -> None:
        self.cfg = config
        self.store = store
        self.metrics = metrics
        self.storage = Storage(list(config.allowed_prefixes) if config.allowed_prefixes else None)
        self.runner = WorkerRunner(
            config.worker_command, config.state_dir, config.allowed_prefixes, config.cancel_grace_s,
            config.trusted_packages,
        )  # fmt: skip
        self.runner.max_download_bytes = config.max_model_bytes
        self.runner.max_job_seconds = config.max_job_seconds
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[Any]] = []
        secret = getattr(store, "secret", None)  # shared: any replica reads any one's tokens
        self._tokens = PageTokens(config.state_dir, secret("page-tokens") if secret else None)
        #: A shared store (PostgreSQL): reads are database I/O, kept off the event loop.
        self.shared = callable(getattr(store, "secret", None))
        #: A job's record from the store's cache without I/O, or None (see jobstore.cache).
        self._cached: Callable[[str], JobRecord | None] = getattr(store, "cached", lambda _id: None)
        self.worker_loop: Any = None
        self._plans = 0  # PlanPruning / validate-only calls running now
        self._unsubscribe: Callable[[], None] | None = None

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        """Recover the embedded store's orphans, wake watchers on the store's
        notifications, and run a worker loop unless API-only."""
        if not self.shared:
            for record in self.store.all():  # its leases died with the last process
                if record.state == JobState.RUNNING:
                    again = recovered(record, self.cfg.max_attempts)
                    if again.state.terminal:  # given up: its checkpoints go before its end
                        discard(again.spec, again.id, self.cfg.allowed_prefixes)
                    self.store.save(again)
        loop = asyncio.get_running_loop()

        def wake(_job: str | None) -> None:  # from the store's writing thread
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._notify()))

        self._unsubscribe = self.store.subscribe(wake)
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
        """Stop the worker loop: it hands its jobs back to the queue."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.worker_loop is not None:
            self.worker_loop.stop()
            await asyncio.wait(self._tasks[-1:], timeout=40)
        for task in self._tasks:
            task.cancel()
        await self.runner.kill_all()

    # -- queries -------------------------------------------------------------
    def get(self, name: str, tenant: str | None = None) -> JobRecord:
        """The job ``name``; NOT_FOUND if there is none or it is another ``tenant``'s."""
        return _owned(self.store.get(job_id(name)), name, tenant)

    def list(
        self, state: JobState | None, page_size: int, page_token: str, tenant: str | None = None
    ) -> tuple[list[JobRecord], str]:
        """Jobs newest first; the token continues after the page's last job (see page_tokens)."""
        if page_size < 0:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size must be >= 0. Received: {page_size}",
                [("page_size", "must be >= 0")],
            )
        after = self._tokens.parse(page_token, state) if page_token else None
        limit = min(page_size or 50, 1000)
        if tenant is None:
            records, last = self.store.page(state, after, limit)
        else:  # only the caller's jobs (a page token carries no tenant: it is only a key)
            records, last = self.store.page(state, after, limit, tenant=tenant)
        return records, self._tokens.issue(state, Cursor(*last)) if last is not None else ""

    async def get_async(self, name: str, tenant: str | None = None) -> JobRecord:
        """:meth:`get` that never blocks the event loop on a shared store: its
        cached record at once, else the database read in a thread."""
        if not self.shared:
            return self.get(name, tenant)  # the embedded store answers from memory
        hit = self._cached(job_id(name))
        if hit is not None:
            return _owned(hit, name, tenant)
        return await asyncio.to_thread(self.get, name, tenant)

    async def list_async(
        self, state: JobState | None, page_size: int, page_token: str, tenant: str | None = None
    ) -> Page:
        """:meth:`list`, in a thread on a shared store."""
        return await self._off_loop(self.list, state, page_size, page_token, tenant)

    async def _off_loop(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in a thread on a shared store (database I/O), else here."""
        return await asyncio.to_thread(call, *args) if self.shared else call(*args)

    async def watch(self, name: str, tenant: str | None = None) -> AsyncIterator[JobRecord]:
        last = await self.get_async(name, tenant)
        yield last
        while not last.state.terminal:
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), WATCH_POLL_S)
                except TimeoutError:
                    pass
            current = await self._reread(last)
            if current != last:
                last = current
                yield last

    async def _reread(self, last: JobRecord) -> JobRecord:
        """A watched job read again from a shared store; as last seen while the store
        is away (PostgreSQL restarting), so the watch goes on and catches up after."""
        hit = self._cached(last.id)
        if hit is not None:
            return hit
        if not self.shared:
            return self.store.get(last.id) or last
        try:
            return await asyncio.to_thread(self.store.get, last.id) or last
        except Exception as exc:  # noqa: BLE001 - StoreUnavailableError and the like
            log.warning("job %s: reading it for a watcher failed (%s); retrying", last.id, exc)
            return last

    # -- commands ----------------------------------------------------------
    async def create(self, sub: Submission, tenant: Tenant = NO_TENANT) -> JobRecord:
        """Queue a validated request (or only check it: ``validate_only``) for ``tenant``.

        The same ``request_id`` returns the job it made first.
        """
        if sub.request_id:
            existing = await self._off_loop(self.store.by_request_id, sub.request_id)
            if existing is not None:
                return _same_tenant(existing, tenant)
        self._check_wall_time(sub.request)
        await asyncio.to_thread(self._check_uris, sub.request, tenant)
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
                return _same_tenant(twin, tenant)  # a concurrent twin won the race
        now = now_ns()
        record = JobRecord(
            id=uuid.uuid4().hex[:16],
            spec=sub.spec,
            state=JobState.QUEUED,
            request_id=sub.request_id,
            create_ns=now,
            update_ns=now,
            message="queued",
            tenant=tenant.name,
        )
        twin = await self._off_loop(self._insert, record)
        if twin is not None:
            return _same_tenant(twin, tenant)  # a twin (on another replica) won the race
        log.info(
            "job %s created: %s -> %s%s",
            record.id, sub.request.model_uri, sub.request.output_uri,
            f" (request_id {sub.request_id})" if sub.request_id else "",
        )  # fmt: skip
        if self.metrics:
            self.metrics.job_submitted()
        if self.worker_loop is not None:
            self.worker_loop.wake()
        await self._notify()
        return record

    async def _queue_depth(self) -> int:
        counts = await self._off_loop(self.store.counts)
        return int(counts.get(JobState.QUEUED, 0))

    def _insert(self, record: JobRecord) -> JobRecord | None:
        """Insert into the store; the job that holds ``request_id`` already, if any."""
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

    def _check_wall_time(self, request: JobRequest) -> None:
        """INVALID_ARGUMENT when ``max_run_seconds`` asks for more than the server allows."""
        cap, asked = self.cfg.max_job_seconds, request.max_run_seconds
        if cap is not None and asked is not None and asked > cap:
            raise convert.invalid(
                "spec.max_run_seconds",
                f"max_run_seconds must be at most this server's --max-job-seconds ({cap:g}). "
                f"Received: {asked:g}",
            )

    def _check_uris(self, request: JobRequest, tenant: Tenant = NO_TENANT) -> None:
        """The pipeline's own pre-flight, before queueing: PERMISSION_DENIED (also
        outside the tenant's own prefixes), NOT_FOUND, ALREADY_EXISTS, or
        INVALID_ARGUMENT for an output inside the model."""
        from secateur.pruner.errors import InvalidSpecError
        from secateur.server.pipeline.boundary import preflight
        from secateur.server.storage import InvalidUriError

        try:
            if tenant.allowed_prefixes:
                narrowed = Storage(list(tenant.allowed_prefixes))
                narrowed.locate(request.model_uri, "model_uri")
                narrowed.locate(request.output_uri, "output_uri")
            preflight(self.storage, request)
        except (InvalidSpecError, InvalidUriError) as exc:
            raise convert.invalid(convert.field_path(exc.field), str(exc)) from exc

    async def cancel(self, name: str, tenant: str | None = None) -> JobRecord:
        record = await self.get_async(name, tenant)
        if record.state.terminal:
            return record
        log.info("job %s: cancel requested while %s", record.id, record.state.value)
        request_cancel = self.store.request_cancel
        done = await self._off_loop(request_cancel, record.id) or record
        if done.state == JobState.CANCELLED:  # it was queued: ended here, not by a worker
            end_line(done, {})
            if done.attempts:  # handed back after a preemption: its checkpoints go
                await asyncio.to_thread(discard, done.spec, done.id, self.cfg.allowed_prefixes)
            if self.metrics:
                self.metrics.job_completed("cancelled", 0.0)
        await self._notify()
        return done

    async def plan(self, model_uri: str, spec: bytes, tenant: Tenant = NO_TENANT) -> dict[str, Any]:
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
            if tenant.allowed_prefixes:  # the tenant's own prefixes, then the server's
                Storage(list(tenant.allowed_prefixes)).locate(model_uri, "model_uri")
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

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
