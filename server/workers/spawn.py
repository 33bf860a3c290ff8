"""Worker subprocesses: start one, feed it its request, read its events and outcome.

The service runs each job (and each PlanPruning call) in its own process
(``python -m secateur.server.workers.job_process``): isolation, real cancellation, clean
memory figures. :class:`WorkerRunner` owns those processes; the job manager
only asks it to run or stop one, by key.

That process reads a user's model file, so it gets nothing it does not need
to read models and write versions: its environment is scrubbed of the job
store's URL and credentials and of tokens (:func:`job_environment`), and a
scaled-out job's publication fence is checked here, in the parent, which
answers the worker's ``{"type": "fence"}`` on its stdin: the store's URL
never reaches it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from secateur.server.errors import ServiceError, incident_message, new_incident
from secateur.server.workers.pipes import (
    MAX_EVENT_LINE,
    WorkerOutput,
    lines,
    parse_event,
    reap,
)

log = logging.getLogger("secateur.server")

#: Called with each ``{"type": "event", ...}`` a job's worker sends.
OnEvent = Callable[[dict[str, Any]], Awaitable[None]]
#: Asked with the version's URI when a job's worker is about to publish there: may it?
#: (the job's lease fence; the answer records the URI in the store)
Fence = Callable[[str], Awaitable[bool]]

#: Variables a worker process never gets, by name: libpq's (PGPASSWORD, PGHOST ...),
#: the store URL of the deploy manifests, and anything named like a credential
#: other than the storage's own (GOOGLE_APPLICATION_CREDENTIALS stays: jobs read gs://).
_SECRET_NAMES = re.compile(
    r"^PG|^SECATEUR_STORE|^DATABASE_URL$|TOKEN|PASSW|SECRET|API_?KEY", re.IGNORECASE
)
#: ... and by value: a PostgreSQL URL, whatever it is called.
_SECRET_VALUES = re.compile(r"^\s*postgres(ql)?://", re.IGNORECASE)


def job_environment(environ: Mapping[str, str], work: str) -> dict[str, str]:
    """The environment of a worker process: ``environ`` without store credentials or tokens.

    ``TMPDIR`` is the job's work dir; the CPU allocator reports peak memory.
    """
    kept = {
        k: v
        for k, v in environ.items()
        if not _SECRET_NAMES.search(k) and not _SECRET_VALUES.match(v)
    }
    return kept | {"TMPDIR": work, "TF_CPU_ALLOCATOR_USE_BFC": "true"}


class WorkerRunner:
    """Start, read and stop worker processes.

    Args:
        command: what a worker runs, ``--events-fd N`` appended.
        state_dir: each worker works (TMPDIR) in ``<state_dir>/work/<key>``,
            removed when it ends.
        allowed_prefixes: the storage allow-list the worker enforces too.
        grace_s: after SIGTERM, how long a worker may take before SIGKILL.
        trusted: installed packages whose registered classes a model file may
            name (``--trust-package``), passed to every worker.
    """

    def __init__(
        self,
        command: tuple[str, ...],
        state_dir: str,
        allowed_prefixes: tuple[str, ...] | None,
        grace_s: float,
        trusted: tuple[str, ...] = (),
    ) -> None:
        self.command = command
        self.state_dir = state_dir
        self.allowed = list(allowed_prefixes or [])
        self.grace_s = grace_s
        self.trusted = list(trusted)
        #: Each worker's model download cap (``--max-model-bytes``); None: no cap.
        self.max_download_bytes: int | None = None
        #: A job run's wall-time limit and the most a spec may ask (``--max-job-seconds``).
        self.max_job_seconds: float | None = None
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._stopping: set[str] = set()
        self._killers: set[asyncio.Task[None]] = set()

    def stop(self, key: str) -> None:
        """Ask ``key``'s worker to stop (SIGTERM, SIGKILL after the grace period).

        A worker not started yet is stopped as soon as it starts.
        """
        self._stopping.add(key)
        proc = self._procs.get(key)
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            self._killers.add(task := asyncio.create_task(self._kill_later(proc)))
            task.add_done_callback(self._killers.discard)

    def kill(self, key: str) -> None:
        """SIGKILL ``key``'s worker at once (its job's lease is lost: it must not go on)."""
        self._stopping.add(key)
        proc = self._procs.get(key)
        if proc is not None and proc.returncode is None:
            proc.kill()

    async def kill_all(self) -> None:
        """SIGKILL every worker and wait for them (the server is stopping)."""
        for proc in list(self._procs.values()):
            if proc.returncode is None:
                proc.kill()
        for proc in list(self._procs.values()):
            await proc.wait()

    async def _kill_later(self, proc: asyncio.subprocess.Process) -> None:
        try:
            await asyncio.wait_for(proc.wait(), self.grace_s)
        except TimeoutError:
            proc.kill()

    async def run(
        self,
        mode: str,
        key: str,
        spec: bytes,
        on_event: OnEvent | None = None,
        fence: Fence | None = None,
        context: Mapping[str, str] | None = None,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Run a worker on ``spec`` (a serialized JobSpec); its outcome and seconds per stage.

        If reading it fails (a store write in ``on_event``, a reader), the
        worker is killed and reaped before the error propagates: no job waits
        on a worker that nobody reads any more. ``fence`` (scaled-out workers:
        the job's lease check) is asked when the job is about to publish, and
        its answer written to the worker's stdin (``worker._fence``). ``context``
        goes into the worker's request: the job's id (``job``, its versions' marker)
        and the version an earlier attempt was fenced to publish (``recover``),
        and the attempt's number (``attempt``, for its checkpoints: checkpoint.py).
        """
        work = os.path.join(self.state_dir, "work", key)
        os.makedirs(work, exist_ok=True)
        read_fd, write_fd = os.pipe()
        payload = self._request(mode, spec, fence is not None, context)
        proc = await self._spawn(work, read_fd, write_fd)
        self._procs[key] = proc
        if key in self._stopping:  # stopped before it started
            self.stop(key)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(payload).encode() + b"\n")
        if fence is None:
            proc.stdin.close()
        output = WorkerOutput(key)
        logs = asyncio.create_task(output.drain(proc.stdout))
        stage_times: dict[str, float] = {}
        answer = None if fence is None else _fence_answerer(proc, fence, key)
        reading = _read_events(read_fd, key, on_event, stage_times, answer)
        try:
            outcome = await _within(proc, reading, self.wall_limit(mode, spec))
            await reap(proc, logs)
        except BaseException:  # also CancelledError: an RPC cancelled or past its deadline
            if proc.returncode is None:
                proc.kill()
            await reap(proc, logs)
            raise
        finally:
            if not proc.stdin.is_closing():
                proc.stdin.close()
            self._procs.pop(key, None)
            shutil.rmtree(work, ignore_errors=True)
        checked = self._checked(key, outcome, proc.returncode, output)
        self._stopping.discard(key)
        return checked, stage_times

    def _request(
        self, mode: str, spec: bytes, fenced: bool, context: Mapping[str, str] | None
    ) -> dict[str, Any]:
        """What a worker reads on its stdin's first line."""
        return {
            "mode": mode,
            "spec": base64.b64encode(spec).decode(),
            "allowed": self.allowed,
            "trusted": self.trusted,
            "max_download_bytes": self.max_download_bytes,
            "fenced": fenced,
            "profile_dir": os.path.join(self.state_dir, "profiles"),  # target jobs' cost profiles
            **(context or {}),
        }

    def wall_limit(self, mode: str, spec: bytes) -> float | None:
        """A job run's wall-time limit: its spec's ``max_run_seconds``, at most the server's."""
        if mode != "job":
            return None
        from secateur.v1 import pruning_pb2

        asked = pruning_pb2.JobSpec.FromString(spec)
        wanted = asked.max_run_seconds if asked.HasField("max_run_seconds") else None
        limits = [s for s in (wanted, self.max_job_seconds) if s is not None and s > 0]
        return min(limits) if limits else None

    async def _spawn(self, work: str, read_fd: int, write_fd: int) -> asyncio.subprocess.Process:
        """Start the worker command writing events to ``write_fd`` (closed here either way)."""
        env = job_environment(os.environ, work)
        try:
            return await asyncio.create_subprocess_exec(
                *self.command, "--events-fd", str(write_fd),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, pass_fds=(write_fd,), env=env,
            )  # fmt: skip
        except BaseException:
            os.close(read_fd)
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            os.close(write_fd)

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
        if not outcome and key in self._stopping:
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


def _fence_answerer(
    proc: asyncio.subprocess.Process, fence: Fence, key: str
) -> Callable[[str], Awaitable[None]]:
    """Answers a worker's fence request on its stdin: ``{"fence": true|false}``.

    Any doubt (the check fails) is an answer of false: not publishing is always safe.
    """

    async def answer(uri: str) -> None:
        try:
            ok = bool(await fence(uri))
        except Exception as exc:  # noqa: BLE001 - a failed check refuses publication
            log.warning("worker %s: the fence check failed (%s); not publishing", key, exc)
            ok = False
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps({"fence": ok}).encode() + b"\n")
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker is gone: nothing to publish

    return answer


async def _read_events(
    fd: int,
    key: str,
    on_event: OnEvent | None,
    stage_times: dict[str, float],
    on_fence: Callable[[str], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Events go to ``on_event`` and time their stages, fence requests to ``on_fence``;
    the last other message is the outcome."""
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
            if msg.get("type") == "fence":  # only a fenced job's worker asks
                if on_fence is not None:
                    await on_fence(str(msg.get("uri") or ""))
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
            if on_event is not None:
                await on_event(msg)
    finally:
        transport.close()
    if stage:
        stage_times[stage] = stage_times.get(stage, 0.0) + time.monotonic() - stage_start
    return outcome


def error_of(outcome: dict[str, Any]) -> ServiceError:
    """The ServiceError a worker's ``{"type": "error", ...}`` outcome stands for."""
    code_name = outcome.get("code", "INTERNAL")
    code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.INTERNAL)
    violations = [tuple(v) for v in outcome.get("violations") or []]
    return ServiceError(code, outcome.get("message") or "worker failed", violations)  # type: ignore[arg-type]


async def _within(
    proc: asyncio.subprocess.Process, reading: Any, limit: float | None
) -> dict[str, Any]:
    """The worker's outcome; past ``limit`` seconds it is killed and the outcome says so."""
    try:
        outcome: dict[str, Any] = await asyncio.wait_for(reading, limit)
        return outcome
    except TimeoutError:
        if limit is None:
            raise
        proc.kill()  # past its wall time: stopped, whatever it was doing
        return past_deadline(limit)


def past_deadline(limit: float) -> dict[str, Any]:
    """The outcome of a job stopped at its wall-time limit (FAILED DEADLINE_EXCEEDED)."""
    return {
        "type": "error",
        "code": "DEADLINE_EXCEEDED",
        "message": f"the job ran past its wall-time limit of {limit:g} s (spec max_run_seconds, "
        "at most the server's --max-job-seconds) and was stopped; nothing was published",
    }
