"""``PruningClient``: the typed Python client of ``secateur.v1.PruningService``.

::

    with PruningClient("pruner:50051", token=token, tls=True, root_certificates=ca) as c:
        job = c.prune("gs://b/model.keras", "gs://b/served", {"ratio": 0.3, "epochs": 3})
        print(job.state, job.result.output_uri)

Unary calls carry the deadline ``timeout`` (for all their attempts
together) and are retried on UNAVAILABLE by gRPC itself: the channel's
service config holds a ``retryPolicy`` (``retries`` + 1 attempts, gRPC caps
them at 5; exponential backoff from ``backoff`` seconds, with gRPC's jitter).
Every unary method is idempotent as this client calls it: reads and
``cancel`` by nature, and ``create`` because it always sends a ``request_id``
(a fresh one when the caller gives none), so a retried create returns the job
the first attempt made instead of making another. Other codes, a deadline
included, are never retried. A ``channel`` passed in keeps its own
configuration (no retries unless it has some).

``watch`` re-opens a stream that breaks with UNAVAILABLE and resumes it,
which gRPC's retries cannot do for a stream that has already delivered
messages. Every error surfaces as ``ClientError`` with the status code, the
details and the ``google.rpc.BadRequest`` field violations the server
attached. Imports grpc and protobuf only.
"""

from __future__ import annotations

import builtins
import json
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any

import grpc

from secateur.v1 import enums, pruning_pb2, pruning_pb2_grpc

from .protospec import job_spec_from_options

TERMINAL_STATES = frozenset(
    {pruning_pb2.Job.STATE_SUCCEEDED, pruning_pb2.Job.STATE_FAILED, pruning_pb2.Job.STATE_CANCELLED}
)
MAX_BACKOFF_SECONDS = 10.0
#: gRPC refuses a retry policy of more attempts than this (and caps it here).
MAX_GRPC_ATTEMPTS = 5
SERVICE = "secateur.v1.PruningService"
# The trailer carrying the call's google.rpc.Status (field violations): gRPC's own name.
STATUS_DETAILS_KEY = "grpc-status-details-bin"
#: The unary methods; each is safe to retry (see the module docstring).
RETRIED_METHODS = ("CreateJob", "GetJob", "ListJobs", "CancelJob", "PlanPruning")
# Plans and sweep results travel as Structs; leave room above gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 2**20


def is_terminal(job: pruning_pb2.Job) -> bool:
    return job.state in TERMINAL_STATES


def job_name(text: str) -> str:
    """``jobs/<id>`` from ``jobs/<id>`` or ``<id>``."""
    text = text.strip()
    if not text or text == "jobs/":
        raise ValueError(f"a job name is jobs/<id> or <id>. Received: {text!r}")
    return text if text.startswith("jobs/") else f"jobs/{text}"


def parse_state(state: str | int | None) -> int:
    """A ``Job.State`` number from a name (``succeeded`` or ``STATE_SUCCEEDED``,
    any case), a number, or None (= all).

    Raises:
        ValueError: no such state; the message lists them.
    """
    if state is None:
        return pruning_pb2.Job.STATE_UNSPECIFIED
    if isinstance(state, int):
        return state
    return enums.from_short_name(pruning_pb2.Job.State, state)


def service_config(retries: int, backoff: float) -> str:
    """The channel's service config: a retry policy on UNAVAILABLE for the unary methods."""
    policy = {
        "maxAttempts": max(min(retries + 1, MAX_GRPC_ATTEMPTS), 2),
        # gRPC requires > 0; below 10 ms its backoff timer misbehaves (a call
        # then waits for its deadline).
        "initialBackoff": f"{max(backoff, 0.01):.3f}s",
        "maxBackoff": f"{MAX_BACKOFF_SECONDS:g}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    methods = [{"service": SERVICE, "method": m} for m in RETRIED_METHODS]
    return json.dumps({"methodConfig": [{"name": methods, "retryPolicy": policy}]})


def violations_from_status(status: Any) -> builtins.list[tuple[str, str]]:
    """(field, description) of every ``google.rpc.BadRequest`` in a ``google.rpc.Status``."""
    from google.rpc import error_details_pb2

    out: builtins.list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out += [(v.field, v.description) for v in bad.field_violations]
    return out


def rich_status(exc: grpc.RpcError) -> Any:
    """The ``google.rpc.Status`` a failed call carries in its trailers, or None.

    What ``grpc_status.rpc_status.from_call`` reads, without that package (the
    client needs grpcio, protobuf and googleapis-common-protos only). None too
    when the status disagrees with the call's code or details, or ``exc`` is
    not a call.
    """
    from google.protobuf.message import DecodeError
    from google.rpc import status_pb2

    try:
        trailers = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
        code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None
    for key, value in trailers:
        if key == STATUS_DETAILS_KEY:
            try:
                status = status_pb2.Status.FromString(value)
            except (DecodeError, TypeError):
                return None
            consistent = status.code == code.value[0] and status.message == details
            return status if consistent else None
    return None


class ClientError(Exception):
    """A call that failed: ``code`` (grpc.StatusCode), ``details``, ``field_violations``."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        field_violations: builtins.list[tuple[str, str]] | None = None,
        *,
        method: str = "",
        attempts: int = 1,
    ) -> None:
        self.code = code
        self.details = details
        self.field_violations = list(field_violations or [])
        self.method = method
        self.attempts = attempts
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.details}"
        for field, description in self.field_violations:
            text += f"\n  {field}: {description}"
        return text

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError, method: str = "", attempts: int = 1) -> ClientError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else None) or ""
        status = rich_status(exc)
        violations = violations_from_status(status) if status is not None else []
        return cls(code, details, violations, method=method, attempts=attempts)


class PruningClient:
    """A connection to a Secateur server; see the module docstring."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.2,
        channel: grpc.Channel | None = None,
    ) -> None:
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError(
                "retries and backoff must be >= 0 and timeout > 0. "
                f"Received: retries={retries}, backoff={backoff}, timeout={timeout}"
            )
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._sleep: Callable[[float], None] = time.sleep  # tests replace it
        self._owns_channel = channel is None
        if channel is None:
            options: list[tuple[str, Any]] = [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
            if retries > 0:
                options += [
                    ("grpc.enable_retries", 1),
                    ("grpc.service_config", service_config(retries, backoff)),
                ]
            if tls or root_certificates or certificate_chain or private_key:
                creds = grpc.ssl_channel_credentials(
                    root_certificates, private_key, certificate_chain
                )
                channel = grpc.secure_channel(target, creds, options=options)
            else:
                channel = grpc.insecure_channel(target, options=options)
        self._channel = channel
        self._stub = pruning_pb2_grpc.PruningServiceStub(channel)

    # -- plumbing ---------------------------------------------------------

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: uniform in [d/2, d], d = backoff * 2**attempt."""
        d = min(self.backoff * 2**attempt, MAX_BACKOFF_SECONDS)
        return random.uniform(d / 2, d)

    def _call(self, method: str, request: Any) -> Any:
        """One unary call; gRPC retries it on UNAVAILABLE (see the module docstring)."""
        rpc = getattr(self._stub, method)
        try:
            return rpc(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            retried = code == grpc.StatusCode.UNAVAILABLE and self._owns_channel
            attempts = min(self.retries + 1, MAX_GRPC_ATTEMPTS) if retried else 1
            raise ClientError.from_rpc_error(exc, method, attempts) from None

    # -- the API ----------------------------------------------------------

    def create(
        self,
        spec: pruning_pb2.JobSpec,
        request_id: str | None = None,
        validate_only: bool = False,
    ) -> pruning_pb2.Job:
        """Create a job (or only validate it). Retries reuse the same ``request_id``."""
        request = pruning_pb2.CreateJobRequest(
            spec=spec, request_id=request_id or str(uuid.uuid4()), validate_only=validate_only
        )
        return self._call("CreateJob", request)

    def prune(
        self,
        model_uri: str,
        output_uri: str,
        spec: pruning_pb2.JobSpec | Mapping[str, Any] | None = None,
        wait: bool = True,
        on_update: Callable[[pruning_pb2.Job], None] | None = None,
        *,
        request_id: str | None = None,
    ) -> pruning_pb2.Job:
        """Submit a job; with ``wait``, watch it and return the terminal job.

        ``spec`` is a ``JobSpec`` (its URIs are replaced by the arguments) or
        the flat options of ``secateur prune`` (``{"ratio": 0.3, ...}``).
        ``on_update`` sees every snapshot, the created job first.
        """
        if isinstance(spec, pruning_pb2.JobSpec):
            job_spec = pruning_pb2.JobSpec()
            job_spec.CopyFrom(spec)
            job_spec.model_uri, job_spec.output_uri = model_uri, output_uri
        else:
            job_spec = job_spec_from_options(model_uri, output_uri, spec or {})
        job = self.create(job_spec, request_id=request_id)
        if on_update:
            on_update(job)
        if not wait or is_terminal(job):
            return job
        return self.wait(job.name, on_update)

    def wait(
        self, name: str, on_update: Callable[[pruning_pb2.Job], None] | None = None
    ) -> pruning_pb2.Job:
        """Watch ``name`` until it ends; the terminal job."""
        last = None
        for last in self.watch(name):
            if on_update:
                on_update(last)
        if last is None:  # watch always yields a terminal job; be safe
            last = self.get(name)
        return last

    def get(self, name: str) -> pruning_pb2.Job:
        request = pruning_pb2.GetJobRequest(name=job_name(name))
        return self._call("GetJob", request)

    def list(
        self, state: str | int | None = None, page_size: int = 50
    ) -> Iterator[pruning_pb2.Job]:
        """Jobs, newest first, following page tokens (lazily: one page per request)."""
        request = pruning_pb2.ListJobsRequest(
            page_size=page_size,
            state=parse_state(state),  # type: ignore[arg-type]
        )
        while True:
            response = self._call("ListJobs", request)
            yield from response.jobs
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def cancel(self, name: str) -> pruning_pb2.Job:
        request = pruning_pb2.CancelJobRequest(name=job_name(name))
        return self._call("CancelJob", request)

    def watch(self, name: str) -> Iterator[pruning_pb2.Job]:
        """Snapshots of the job on every change, up to and including the terminal one.

        A stream that breaks with UNAVAILABLE is re-opened after a backoff
        (``retries`` times in a row at most; a message received resets the
        count). Snapshots equal to the last one yielded are skipped.
        """
        request = pruning_pb2.WatchJobRequest(name=job_name(name))
        last: pruning_pb2.Job | None = None
        failures = 0  # re-opens in a row without a message in between
        while True:
            stream = self._stub.WatchJob(request, metadata=self._metadata)
            try:
                for job in stream:
                    failures = 0
                    if job != last:
                        last = job
                        yield job
                    if is_terminal(job):
                        return
                broke: grpc.RpcError | None = None
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code != grpc.StatusCode.UNAVAILABLE or failures >= self.retries:
                    raise ClientError.from_rpc_error(exc, "WatchJob", failures + 1) from None
                broke = exc
            finally:
                stream.cancel()
            if broke is None and failures >= self.retries:
                raise ClientError(
                    grpc.StatusCode.UNKNOWN,
                    f"the watch stream of {request.name} kept ending before the job did",
                    method="WatchJob",
                    attempts=failures + 1,
                )
            if last is not None:
                # No terminal snapshot came: the job may have ended while no
                # stream was open.
                try:
                    job = self.get(request.name)
                except ClientError:
                    job = last
                if is_terminal(job):
                    if job != last:
                        yield job
                    return
            self._sleep(self._delay(failures))
            failures += 1

    def plan(
        self,
        model_uri: str,
        pruning: pruning_pb2.PruningSpec | Mapping[str, Any] | None = None,
    ) -> pruning_pb2.PlanPruningResponse:
        """Dry run on a model: the plan, channel groups, params/FLOPs before and after."""
        if not isinstance(pruning, pruning_pb2.PruningSpec):
            pruning = job_spec_from_options(model_uri, "", pruning or {}).pruning
        request = pruning_pb2.PlanPruningRequest(model_uri=model_uri, pruning=pruning)
        return self._call("PlanPruning", request)

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> PruningClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
