"""A job's own process: ``python -m secateur.server.workers.job_process --events-fd N``.

The service starts one per job (isolation, real cancellation, clean memory
figures) and one per PlanPruning call. The request arrives on stdin as JSON;
events and the outcome leave as JSON lines on the file descriptor
``--events-fd`` (stdout and stderr stay free for TensorFlow's chatter, which
the service logs). A scaled-out job (``"fenced": true``) asks before
publishing whether its worker still holds the job's lease: it writes
``{"type": "fence", "uri": VERSION}`` and reads ``{"fence": true|false}`` from stdin
(the worker records VERSION in the store with the fence); the
store itself is never reachable from here (no URL, no credentials: the
service scrubs this process's environment, see ``spawn.job_environment``).
A job given ``"recover": URI`` (an earlier attempt was fenced to publish there)
first looks there for its own complete version and, finding it, reports its
result without running again (server/pipeline/publish.py).
SIGTERM asks the job to stop at its next check point; the process also dies
with the service (PR_SET_PDEATHSIG), so an orphan can never publish a model
for a job the restarted service runs again.

Lines written::

    {"type": "event", "stage": ..., "progress": ..., "message": ...}
    {"type": "result", "report": {...}}          success
    {"type": "gate_failed", "report": {...}}     no candidate within budget
    {"type": "plan", "plan": {...}}              PlanPruning
    {"type": "fence", "uri": ...}                may this job publish there? (answer on stdin)
    {"type": "error", "code": "NOT_FOUND", "message": ..., "violations": [...]}
    {"type": "error", "code": "INTERNAL", "message": ..., "incident": ID}
                                                 traceback on stderr with ID
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_cancelled = False


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the service still kills its workers itself
        pass


def _on_term(signum: int, frame: Any) -> None:
    global _cancelled
    _cancelled = True


class Emitter:
    def __init__(self, fd: int) -> None:
        self.out = os.fdopen(fd, "w", buffering=1)
        self._last_tick = 0.0

    def send(self, **payload: Any) -> None:
        self.out.write(json.dumps(payload, default=str) + "\n")
        self.out.flush()

    def event(self, e: Any) -> None:
        now = time.monotonic()
        if "step" in e.detail and now - self._last_tick < 0.25:
            return  # training ticks: at most four a second
        self._last_tick = now
        detail = {k: v for k, v in e.detail.items() if isinstance(v, (int, float, str))}
        self.send(
            type="event", stage=e.stage, progress=e.progress, message=e.message, detail=detail
        )


def run(payload: dict[str, Any], emit: Emitter) -> None:
    from secateur.server.pipeline.convert import job_request
    from secateur.server.pipeline.prune_job import GateFailed, LeaseLost, PruneJob
    from secateur.server.pipeline.publish import settle
    from secateur.server.storage import Storage
    from secateur.v1 import pruning_pb2 as pb

    spec = pb.JobSpec.FromString(base64.b64decode(payload["spec"]))
    storage = Storage(
        payload.get("allowed") or None, max_download_bytes=payload.get("max_download_bytes")
    )
    trusted = tuple(payload.get("trusted") or ())
    if payload["mode"] == "plan":
        emit.send(type="plan", plan=_plan(spec, storage, trusted, payload.get("profile_dir")))
        return
    request = job_request(spec)
    job_id = str(payload.get("job") or "")
    if payload.get("recover") and job_id:
        found = settle(storage, str(payload["recover"]), job_id)  # and its staging removed
        if found.report is not None:  # published by an earlier attempt: never run twice
            from secateur.server.pipeline.checkpoint import discard

            discard(base64.b64decode(payload["spec"]), job_id, payload.get("allowed"))
            emit.send(type="result", report=found.report)  # its output clean before it ends
            return
    try:
        fence = _fence(emit) if payload.get("fenced") else None
        report = PruneJob(
            request, storage, emit.event, lambda: _cancelled, fence=fence, trusted=trusted,
            profile_dir=payload.get("profile_dir"),
            job_id=job_id,
            checkpoints=_checkpoints(payload, storage, trusted),
        ).run()  # fmt: skip
    except LeaseLost as lost:
        emit.send(type="error", code="ABORTED", message=str(lost), lease_lost=True)
        return
    except GateFailed as gate:
        emit.send(type="gate_failed", report=gate.report)
        return
    emit.send(type="result", report=report)


def _checkpoints(payload: dict[str, Any], storage: Any, trusted: tuple[str, ...]) -> Any:
    """The job's checkpoints in its work area (a job the service runs; see checkpoint.py)."""
    from secateur.server.pipeline.checkpoint import Checkpoints, every_s, work_area
    from secateur.v1 import pruning_pb2 as pb

    job = str(payload.get("job") or "")
    if not job:
        return None
    raw = base64.b64decode(payload["spec"])
    area = work_area(storage, pb.JobSpec.FromString(raw).output_uri, job)
    fingerprint = Checkpoints.fingerprint_of(raw)
    attempt = int(payload.get("attempt") or 0)
    return Checkpoints(storage, area, fingerprint, attempt, trusted, every_s())


def _fence(emit: Emitter) -> Callable[[str], bool]:
    """The publication fence of a job a scaled-out worker leased to this process.

    The worker holding the lease checks it in the store (extending it for the
    publication) and answers on stdin; no answer (the worker is gone) or
    anything but true means: do not publish.
    """

    def check(uri: str) -> bool:
        emit.send(type="fence", uri=uri)
        try:
            return json.loads(sys.stdin.readline()).get("fence") is True
        except (ValueError, AttributeError):
            return False

    return check


def _plan(
    spec: Any, storage: Any, trusted: tuple[str, ...], profile_dir: str | None
) -> dict[str, Any]:
    from secateur.pruner.api import make_plan  # by ratio, or to targets
    from secateur.pruner.modelio import load_model
    from secateur.server.pipeline.boundary import user_paths
    from secateur.server.pipeline.convert import prune_spec

    names: dict[str, str] = {}
    with (
        tempfile.TemporaryDirectory(prefix="secateur-plan-") as work,
        user_paths(names, fallback=spec.model_uri),  # errors name the URI, not the copy
    ):
        path = storage.download(spec.model_uri, work)
        names[path] = spec.model_uri
        model = load_model(path, trusted)
        return make_plan(model, prune_spec(spec.pruning), state_dir=profile_dir).to_dict()


def _internal(exc: BaseException, emit: Emitter) -> int:
    """Report an unexpected error: traceback on stderr, the same incident id in the outcome.

    The service logs stderr; the client gets INTERNAL naming the incident to
    look up there, never the traceback.
    """
    from secateur.server.errors import incident_message, new_incident

    incident = new_incident()
    print(f"internal error in the worker (incident {incident}):", file=sys.stderr)
    traceback.print_exception(exc)
    sys.stderr.flush()
    message = incident_message("the worker failed", incident)
    emit.send(type="error", code="INTERNAL", incident=incident, message=message)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events-fd", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    signal.signal(signal.SIGTERM, _on_term)
    emit = Emitter(args.events_fd)
    payload: dict[str, Any] = {}
    try:
        payload = json.loads(sys.stdin.readline())  # one line; the fence answers follow
        run(payload, emit)
    except BaseException as exc:  # noqa: BLE001 - every outcome is reported
        from secateur.server.errors import status_of
        from secateur.server.pipeline.convert import field_path

        err = status_of(exc)
        if err is None:
            return _internal(exc, emit)
        violations = err.violations
        if payload.get("mode") == "job":  # the library's field names -> the JobSpec's paths
            violations = [(field_path(f), d) for f, d in violations]
        emit.send(type="error", code=err.code.name, message=err.message, violations=violations)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
