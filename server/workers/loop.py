"""The one job runner: claim queued jobs from a queue store, run them, hold their leases.

``secateur worker``, and ``secateur serve`` with any store (the embedded
SQLite one included) and ``--max-concurrent-jobs`` > 0, run one
:class:`WorkerLoop`. It claims up to ``max_concurrent`` jobs at once from a
queue store (``store.claim``: attempts + 1, a new fencing token; PostgreSQL's
is ``SELECT ... FOR UPDATE SKIP LOCKED``) and runs each in its own subprocess
(``workers/spawn.py``).
While a job runs its lease is renewed every ``lease_s / 3`` seconds (at
least every ``RENEW_MAX_S``, so a cancel reaches the job within seconds):

- the renewal says the job's cancel was requested (CancelJob on any
  replica): the subprocess gets SIGTERM and the job ends CANCELLED (once its
  fence let it publish, it is left to finish and ends SUCCEEDED: never half);
- the renewal finds the lease gone (this worker was paused or cut off past
  its lease and another worker claimed the job): the subprocess is killed and
  nothing is written — the new owner's record is not ours to touch;
- a renewal that fails (PostgreSQL restarting) is retried until the lease
  would have expired.

Every write is ``store.save_leased(record, token)``: refused once the token
is stale, so a zombie never overwrites the new owner's job. Right before
publishing, the subprocess asks this loop to check the lease (``store.fence``,
answered through the runner: the subprocess never sees the store), so a model
is never published by a worker that lost its job. On SIGTERM the loop stops
claiming, stops its subprocesses and hands their jobs back to the queue
(:func:`handed_back`: CANCELLED when a cancel is pending, FAILED once a job
was stopped ``max_preemptions`` times). A job whose fence recorded a version
and that ends FAILED or CANCELLED (its wall time, the preemption cap, a
cancel, or a claim the store gives only to end it: ``Claim.ending``) has that
publication settled first (``lifecycle.settled``: its complete version ends it
SUCCEEDED, its half version and staging are removed). On
start it removes the work dirs a killed worker left in its state dir
(:func:`sweep_work`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Any

import grpc

from secateur.server.errors import ServiceError
from secateur.server.jobstore.records import JobRecord, JobState, now_ns
from secateur.server.pipeline.checkpoint import discard
from secateur.server.pipeline.job_request import STAGES, overall_progress
from secateur.server.storage import Storage
from secateur.server.workers.lifecycle import ended, outcome_label, settled
from secateur.server.workers.spawn import WorkerRunner, error_of

log = logging.getLogger("secateur.server")
#: The longest pause between two renewals of a lease (the cancel flag comes with them).
RENEW_MAX_S = 1.0
#: How often a shared store's queue depth and running count refresh the metrics.
COUNTS_EVERY_S = 5.0


def default_worker_id() -> str:
    """``hostname-pid``: unique among the workers sharing a store."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class LoopConfig:
    worker_id: str
    max_concurrent: int = 1
    lease_s: float = 30.0
    max_attempts: int = 3
    #: How long to wait before asking for work again when the queue was empty.
    idle_poll_s: float = 1.0
    #: Publication needs at least this much of the lease left (store.fence; see fence_margin).
    fence_margin_s: float = 2.0
    #: Runs a job may start before its workers' hand-backs (SIGTERM) end it FAILED.
    max_preemptions: int = 10


@dataclass
class _Held:
    """A job this worker runs: its latest record and what the renewals found."""

    record: JobRecord
    token: int
    key: str
    lost: bool = False
    cancel: bool = False
    last_write: float = 0.0
    #: The version an earlier attempt was fenced to publish ("" for none): looked at first.
    recover: str = ""
    #: The fence let this attempt publish: a cancel no longer stops its process (the
    #: job ends SUCCEEDED), so a cancel never cuts a gs:// publish in half.
    fenced: bool = False
    #: The version this attempt's fence let it publish (recorded in the store).
    publishing: str = ""


class WorkerLoop:
    """Claim, run and renew jobs of a queue store (see module docstring)."""

    def __init__(self, cfg: LoopConfig, store: Any, runner: WorkerRunner, metrics: Any = None):
        self.cfg = cfg
        self.store = store
        self.runner = runner
        self.metrics = metrics
        self._held: dict[str, _Held] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._slot = asyncio.Event()
        self._wake = asyncio.Event()
        self._storage: Storage | None = None

    @property
    def running(self) -> int:
        return len(self._held)

    async def run(self) -> None:
        """Claim jobs until :meth:`stop`; then hand the running ones back."""
        await self._sweep()
        while not self._stopping.is_set():
            if len(self._held) >= self.cfg.max_concurrent:
                self._slot.clear()
                await self._wait(self._slot, None)
                continue
            self._wake.clear()
            claim = await self._claim()
            if claim is None:
                await self._wait(self._wake, self.cfg.idle_poll_s)
                continue
            held = _Held(claim.record, claim.token, key=f"{claim.record.id}-{claim.token}")
            held.recover = claim.publish_uri
            self._held[claim.record.id] = held  # before the next claim: max_concurrent holds
            ending = getattr(claim, "ending", None)
            job = self._run_job(held) if ending is None else self._end(held, ending)
            task = asyncio.create_task(job)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await self._release_all()

    def wake(self) -> None:
        """Ask for work now rather than at the next poll (a job was just queued here)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop claiming (the first step of a graceful shutdown)."""
        self._stopping.set()
        self._slot.set()

    async def _wait(self, event: asyncio.Event, timeout: float | None) -> None:
        waiter = asyncio.ensure_future(event.wait())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiter, stop}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            waiter.cancel()
            stop.cancel()

    async def _sweep(self) -> None:
        """Remove the work dirs a killed worker left here (see :func:`sweep_work`)."""
        try:
            removed = await asyncio.to_thread(sweep_work, self.runner.state_dir, self.store)
        except Exception as exc:  # noqa: BLE001 - the store is away: the next start sweeps
            log.warning("worker %s: sweeping old work dirs failed (%s)", self.cfg.worker_id, exc)
            return
        if removed:
            log.info("removed work dirs no lease holds any more: %s", ", ".join(removed))

    async def _claim(self) -> Any:
        try:
            return await asyncio.to_thread(
                self.store.claim, self.cfg.worker_id, self.cfg.lease_s, self.cfg.max_attempts
            )
        except Exception as exc:  # noqa: BLE001 - the store is away: try again later
            log.warning("worker %s: claiming a job failed (%s); retrying", self.cfg.worker_id, exc)
            return None

    # -- one job -----------------------------------------------------------
    async def _run_job(self, held: _Held) -> None:
        record, token = held.record, held.token
        log.info(
            "job %s started (attempt %d) on worker %s, token %d",
            record.id, record.attempts, self.cfg.worker_id, token,
        )  # fmt: skip
        renewer = asyncio.create_task(self._renew(held))
        started = time.monotonic()
        try:
            outcome, stage_times = await self.runner.run(
                "job", held.key, record.spec, lambda msg: self._progress(held, msg),
                lambda uri: self._fence(held, uri),
                {"job": record.id, "recover": held.recover, "attempt": str(record.attempts)},
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reading it failed: the job fails
            outcome, stage_times = {"type": "error", "code": "INTERNAL", "message": str(exc)}, {}
        finally:
            renewer.cancel()
        try:
            lost = held.lost or (outcome.get("lease_lost") and not held.cancel)
            if lost or self._stopping.is_set():
                if not self._stopping.is_set():
                    log.warning("job %s: worker %s lost its lease", record.id, self.cfg.worker_id)
                return  # the job is someone else's now, or handed back by _release_all
            final = await self._settled(held, conclude(held.record, outcome, held.cancel))
            if held.lost or not await self._write(held, final, must=True):
                return
            self._observe(final, outcome, stage_times, time.monotonic() - started)
        finally:
            if not self._stopping.is_set():
                self._held.pop(record.id, None)
                self._slot.set()

    async def _end(self, held: _Held, ending: JobRecord) -> None:
        """A job the store will not run again but whose fence recorded a version
        (Claim.ending): its publication settled and its checkpoints removed, then its end
        written."""
        try:
            final = await self._settled(held, ending)
            if not held.lost and await self._write(held, final, must=True):
                self._observe(final, {}, {}, 0.0)
            held.lost = True  # ended: nothing of it is ours to hand back any more
        finally:
            self._held.pop(held.record.id, None)
            self._slot.set()

    async def _fence(self, held: _Held, uri: str) -> bool:
        """May ``held``'s job publish ``uri`` now? (``store.fence``, its margin scaled to the
        lease; a yes records ``uri``, so a later attempt finds the version it publishes).

        A store error is retried while the lease could last; a refusal is
        looked into once: the job's cancel was requested (it ends CANCELLED,
        unpublished), or the lease ran short (renewed, then asked again).
        """
        margin = fence_margin(self.cfg)
        job, token = held.record.id, held.token
        for _ in range(2):
            ok = await self._retried(self.store.fence, job, token, margin, uri)
            held.fenced = held.fenced or bool(ok)
            held.publishing = uri if ok else held.publishing
            if ok or held.lost:
                return bool(ok)
            lease = await self._retried(self.store.renew, job, token, self.cfg.lease_s)
            if not lease.held or lease.cancel_requested:
                held.cancel = held.cancel or bool(lease.held and lease.cancel_requested)
                return False
        return False

    async def _settled(self, held: _Held, final: JobRecord) -> JobRecord:
        """``final`` (an end; anything else is returned as it is) once the publication its
        fence recorded is settled (lifecycle.settled: a complete version of the job makes it
        SUCCEEDED, a half one is removed) and its checkpoints are removed, before the end
        is written, so whoever sees the end sees a clean output; only while this worker
        still holds the job (renewed first), so never under another attempt that may be
        publishing that version, or checkpointing, now."""
        if not final.state.terminal:
            return final
        try:
            lease = await self._retried(
                self.store.renew, held.record.id, held.token, self.cfg.lease_s
            )
        except Exception as exc:  # noqa: BLE001 - the store is away: the write fails too
            log.warning("job %s: renewing before settling failed (%s)", held.record.id, exc)
            return final
        if not lease.held:
            log.warning("job %s: worker %s lost its lease", held.record.id, self.cfg.worker_id)
            held.lost = True
            return final
        uri = held.publishing or held.recover
        if uri and final.state in (JobState.FAILED, JobState.CANCELLED):
            if self._storage is None:
                self._storage = Storage(getattr(self.runner, "allowed", None) or None)
            final = await asyncio.to_thread(settled, final, uri, self._storage)
        await self._discard(final)
        return final

    async def _retried(self, call: Any, *args: Any) -> Any:
        """``call(*args)`` in a thread, retried on errors for up to a lease (then raised)."""
        deadline = time.monotonic() + self.cfg.lease_s
        while True:
            try:
                return await asyncio.to_thread(call, *args)
            except Exception as exc:  # the store is away for a moment (raised after a lease)
                if time.monotonic() >= deadline:
                    raise
                log.warning("job %s: the store did not answer (%s); retrying", args[0], exc)
                await asyncio.sleep(0.5)

    async def _renew(self, held: _Held) -> None:
        """Renew the lease every lease_s / 3 s; stop the subprocess when it is lost or cancelled."""
        every = min(self.cfg.lease_s / 3, RENEW_MAX_S)
        good_until = time.monotonic() + self.cfg.lease_s
        while True:
            await asyncio.sleep(every)
            try:
                lease = await asyncio.to_thread(
                    self.store.renew, held.record.id, held.token, self.cfg.lease_s
                )
            except Exception as exc:  # noqa: BLE001 - retried until the lease would expire
                if time.monotonic() + every < good_until:
                    log.warning("job %s: renewing its lease failed (%s)", held.record.id, exc)
                    continue
                lease = None
            if lease is None or not lease.held:
                held.lost = True
                self.runner.kill(held.key)
                return
            good_until = time.monotonic() + self.cfg.lease_s
            if lease.cancel_requested and not held.cancel:
                held.cancel = True
                if held.fenced:  # publishing: stopping it now could only leave half a version
                    log.info(
                        "job %s: cancel requested while it publishes; too late", held.record.id
                    )
                    continue
                log.info("job %s: cancel requested; stopping its process", held.record.id)
                self.runner.stop(held.key)

    async def _progress(self, held: _Held, msg: dict[str, Any]) -> None:
        """A subprocess event: written at each stage change and at most once a second."""
        stage = msg["stage"] if msg["stage"] in STAGES else ""
        old = held.record
        held.record = old.evolve(
            stage=stage,
            progress=overall_progress(msg["stage"], float(msg.get("progress") or 0.0)),
            message=f"{msg['stage'].lower()}: {msg.get('message', '')}".strip(),
        )
        if stage != old.stage or time.monotonic() - held.last_write >= 1.0:
            if stage != old.stage:
                log.info("job %s: stage %s", held.record.id, stage or msg["stage"])
            await self._write(held, held.record, must=False)

    async def _write(self, held: _Held, record: JobRecord, must: bool) -> bool:
        """``save_leased``; False once fenced out. ``must``: retried until the lease is gone."""
        held.last_write = time.monotonic()
        deadline = time.monotonic() + (self.cfg.lease_s if must else 0.0)
        while True:
            try:
                ok = await asyncio.to_thread(self.store.save_leased, record, held.token)
                break
            except Exception as exc:  # noqa: BLE001 - the store is away for a moment
                if time.monotonic() >= deadline:
                    log.warning("job %s: storing it failed (%s)", record.id, exc)
                    return False
                await asyncio.sleep(0.5)
        if not ok:
            held.lost = True
            log.warning("job %s: fenced out (another worker owns it now)", record.id)
        return bool(ok)

    def _observe(
        self, final: JobRecord, outcome: dict[str, Any], stage_times: dict[str, float], secs: float
    ) -> None:
        end_line(final, outcome)
        if not self.metrics:
            return
        for stage, t in stage_times.items():
            self.metrics.stage_finished(stage, t)
        if final.result is not None:
            self.metrics.record_figures(final.result.get("original"), final.result.get("pruned"))
            self.metrics.record_targets(final.result.get("targets"))
        self.metrics.job_completed(outcome_label(final), secs)

    async def _discard(self, final: JobRecord) -> None:
        """The job ended: its checkpoints go (its process removed them unless it was killed)."""
        await asyncio.to_thread(discard, final.spec, final.id, self.runner.allowed)

    async def _release_all(self) -> None:
        """Shutting down: kill our subprocesses and hand their jobs back to the queue."""
        held = list(self._held.values())
        for h in held:
            self.runner.kill(h.key)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=30)
        for h in held:
            if h.lost:
                continue
            back = await self._settled(h, await self._handed_back(h))
            if await self._write(h, back, must=False):
                log.info("job %s handed back: %s", h.record.id, back.message)
        self._held.clear()

    async def _handed_back(self, h: _Held) -> JobRecord:
        """:func:`handed_back`, with a cancel pending in the store seen first (so a
        CANCELLED hand-back settles its publication here too)."""
        if not h.cancel:
            try:
                lease = await asyncio.to_thread(
                    self.store.renew, h.record.id, h.token, self.cfg.lease_s
                )
                h.cancel = lease.held and lease.cancel_requested
            except Exception as exc:  # noqa: BLE001 - the store converts it on the write
                log.warning("job %s: reading its cancel failed (%s)", h.record.id, exc)
        return handed_back(h.record, self.cfg, h.cancel)


def fence_margin(cfg: LoopConfig) -> float:
    """The lease a publication needs left: ``fence_margin_s``, at most a quarter of the lease
    (renewals every third of it keep more than that, so a short lease can still publish)."""
    return min(cfg.fence_margin_s, cfg.lease_s / 4)


def handed_back(record: JobRecord, cfg: LoopConfig, cancelled: bool) -> JobRecord:
    """A running job its stopping worker gives up: QUEUED again; CANCELLED when its cancel
    was seen; FAILED once it ran ``max_preemptions`` times without finishing (a job that
    every scale-down stops never ends otherwise). The stores also end a hand-back
    CANCELLED when a cancel is pending that this worker did not see yet."""
    if cancelled:
        return conclude(record, {"type": "error"}, True)
    if record.attempts >= cfg.max_preemptions:
        error = ServiceError(
            grpc.StatusCode.ABORTED,
            f"the job was stopped {record.attempts} times before it finished (its workers "
            f"shut down: scale-down, preemption; the last was {cfg.worker_id}); giving up "
            f"(secateur worker --max-preemptions, now {cfg.max_preemptions})",
        )
        return ended(record, JobState.FAILED, error, None, now_ns())
    return record.evolve(
        state=JobState.QUEUED,
        stage="",
        progress=0.0,
        worker="",
        lease_expires=0.0,
        message=f"worker {cfg.worker_id} stopped; the job will run again",
    )


async def publish_counts(store: Any, metrics: Any) -> None:
    """Set the queue metrics from a shared store's counts (a failure only logs)."""
    try:
        counts = await asyncio.to_thread(store.counts)
    except Exception as exc:  # noqa: BLE001 - the store is away: keep the last numbers
        log.warning("reading the job counts failed (%s)", exc)
        return
    metrics.set_queue(int(counts.get(JobState.QUEUED, 0)), int(counts.get(JobState.RUNNING, 0)))


def sweep_work(state_dir: str, store: Any) -> list[str]:
    """Remove each ``<state_dir>/work/<job>-<token>`` that no live lease holds; their names.

    A worker killed with its jobs (SIGKILL, OOM, node lost) leaves their work
    dirs behind; its jobs are reclaimed elsewhere under new tokens. A dir
    whose job still runs under that very token (another worker process
    sharing this state dir) is kept; so are plan dirs and anything else.
    """
    root = os.path.join(state_dir, "work")
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    keys: dict[str, tuple[str, int]] = {}
    for name in names:
        job, sep, token = name.rpartition("-")
        if sep and job and not name.startswith("plan-") and token.isdigit():
            keys[name] = (job, int(token))
    if not keys:
        return []
    live = store.live_leases(sorted({job for job, _ in keys.values()}))
    stale = sorted(name for name, (job, token) in keys.items() if live.get(job) != token)
    for name in stale:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return stale


def conclude(record: JobRecord, outcome: dict[str, Any], cancelled: bool) -> JobRecord:
    """The job's final record from its subprocess's outcome (as the embedded server ends it)."""
    kind = outcome.get("type")
    error: ServiceError | None = None
    report = outcome.get("report") if kind in ("result", "gate_failed") else None
    if cancelled and kind != "result":
        state, error = JobState.CANCELLED, ServiceError(grpc.StatusCode.CANCELLED, "cancelled")
    elif kind == "result":
        state = JobState.SUCCEEDED
    elif kind == "gate_failed":
        state = JobState.FAILED
        assert report is not None
        error = ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION, f"accuracy gate failed: {report.get('decision')}"
        )
    else:
        state, error = JobState.FAILED, error_of(outcome)
    return ended(record, state, error, report, now_ns())


def end_line(final: JobRecord, outcome: dict[str, Any]) -> None:
    """The lifecycle line of a job's end on a worker."""
    code = f" {final.error.code.name}" if final.error is not None else ""
    since = final.start_ns or final.create_ns
    log.info(
        "job %s finished: %s%s after %.1f s (%d attempt(s))",
        final.id, final.state.value.lower(), code,
        (final.end_ns - since) / 1e9 if since else 0.0, final.attempts,
    )  # fmt: skip
