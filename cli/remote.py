"""Subcommands against a server: ``submit``, ``status``, ``watch``, ``cancel``, ``list``.

grpc and protobuf only (through ``secateur.client``): never the server, the
pruner or TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from secateur.cli.options import job_spec
from secateur.cli.outcome import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_GATE,
    EXIT_OK,
    exit_code_for_error,
    exit_code_for_job,
)
from secateur.cli.progress import ProgressDisplay
from secateur.cli.render import format_table, job_summary, jobs_table
from secateur.cli.signals import sigterm_as_interrupt
from secateur.v1 import enums, pruning_pb2

if TYPE_CHECKING:
    from secateur.client.client import ClientError, PruningClient

DEFAULT_SERVER = "localhost:50051"


def server_address(args: argparse.Namespace) -> str:
    return args.server or os.environ.get("SECATEUR_SERVER") or DEFAULT_SERVER


class UsageError(Exception):
    """Bad local input (flags, files): exit 2 with the message."""


def _read_file(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def connect(args: argparse.Namespace) -> PruningClient:
    """A ``PruningClient`` from the connection flags."""
    from secateur.client.client import PruningClient

    if args.token_file:
        token = (_read_file(args.token_file, "token file") or b"").decode().strip()
    else:
        token = os.environ.get("SECATEUR_TOKEN", "").strip()
    if args.token_file and not token:
        raise UsageError(f"the token file {args.token_file} is empty")
    if bool(args.client_cert) != bool(args.client_key):
        raise UsageError("--client-cert and --client-key go together (mTLS)")
    if args.retries < 0 or args.timeout <= 0:
        raise UsageError(
            f"--retries must be >= 0 and --timeout > 0. "
            f"Received: --retries {args.retries} --timeout {args.timeout}"
        )
    return PruningClient(
        server_address(args),
        token=token or None,
        tls=bool(args.tls or args.ca_cert or args.client_cert),
        root_certificates=_read_file(args.ca_cert, "CA certificate"),
        certificate_chain=_read_file(args.client_cert, "client certificate"),
        private_key=_read_file(args.client_key, "client key"),
        timeout=args.timeout,
        retries=args.retries,
    )


def _print_error(err: ClientError, args: argparse.Namespace) -> int:
    name = err.code.name
    server = server_address(args)
    if name == "UNAVAILABLE":
        msg = f"server {server} unavailable after {err.attempts} attempt(s): {err.details}"
    elif name == "DEADLINE_EXCEEDED":
        msg = f"no answer from {server} within {args.timeout:g}s ({err.method or 'call'})"
    else:
        msg = f"{name}: {err.details}"
    print(f"secateur: error: {msg}", file=sys.stderr)
    for field, description in err.field_violations:
        print(f"  {field}: {description}", file=sys.stderr)
    return exit_code_for_error(err)


def finish_job(
    job: pruning_pb2.Job, report_path: str | None = None, *, summary: bool = True
) -> int:
    """Print a terminal job's table (stdout) and what went wrong (stderr); its exit code.

    A job without figures (failed or cancelled early) gets its summary line
    instead of the table (unless ``summary`` is False: the caller printed it).
    """
    from secateur.client.client import violations_from_status
    from secateur.client.protospec import code_name, report_from_job

    report = report_from_job(job)
    if report["original"] is not None:
        print(format_table(report))
    elif summary:
        print(job_summary(job))
    if report_path:
        with open(report_path, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
    code = exit_code_for_job(job)
    if code == EXIT_GATE:
        print(f"secateur: accuracy gate failed: {job.result.decision}", file=sys.stderr)
    elif job.state == pruning_pb2.Job.STATE_CANCELLED:
        print(f"secateur: {job.name} was cancelled; nothing was published", file=sys.stderr)
    elif job.state == pruning_pb2.Job.STATE_FAILED:
        what = f"{code_name(job.error.code)}: {job.error.message}"
        print(f"secateur: {job.name} failed: {what}", file=sys.stderr)
        for field, description in violations_from_status(job.error):
            print(f"  {field}: {description}", file=sys.stderr)
    return code


def _wait_and_finish(client: PruningClient, name: str, args: argparse.Namespace) -> int:
    bar = ProgressDisplay()
    try:
        with sigterm_as_interrupt():
            job = client.wait(name, on_update=bar.job)
    except KeyboardInterrupt:
        bar.close()
        if args.cancel_on_interrupt:
            job = client.cancel(name)
            state = enums.short_name(pruning_pb2.Job.State, job.state)
            print(f"secateur: interrupted; cancelled {name} ({state})", file=sys.stderr)
        else:
            print(
                f"secateur: stopped watching; {name} goes on on the server "
                f"(secateur cancel {name} stops it)",
                file=sys.stderr,
            )
        return EXIT_CANCELLED
    bar.close()
    return finish_job(job, getattr(args, "report", None))


def _remote(run: Any) -> Any:
    """Wrap a server subcommand: connect, map call errors and bad local input to exit codes."""

    def wrapped(args: argparse.Namespace) -> int:
        from secateur.client.client import ClientError

        try:
            with connect(args) as client:
                return int(run(client, args))
        except ClientError as err:
            return _print_error(err, args)
        except (UsageError, ValueError, OSError) as exc:
            print(f"secateur: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT

    wrapped.__name__ = run.__name__
    wrapped.__doc__ = run.__doc__
    return wrapped


def _submit(client: PruningClient, args: argparse.Namespace) -> int:
    """Create a job from the spec flags; with --wait, follow it and exit by its outcome."""
    spec = job_spec(args)  # the same JobSpec `secateur prune` converts locally
    job = client.create(spec, request_id=args.request_id, validate_only=args.validate_only)
    if args.validate_only:
        print(f"valid: the server would accept this job ({args.model_uri} -> {args.output_uri})")
        return EXIT_OK
    if not args.wait:
        print(job.name)
        return EXIT_OK
    print(f"submitted {job.name}", file=sys.stderr)
    return _wait_and_finish(client, job.name, args)


def _status(client: PruningClient, args: argparse.Namespace) -> int:
    """Print a job's summary, and its table once it has ended."""
    from secateur.client.client import is_terminal, job_name

    job = client.get(job_name(args.job))
    print(job_summary(job))
    where = worker_line(job)
    if where:
        print(where)
    if not is_terminal(job):
        return EXIT_OK
    return finish_job(job, args.report, summary=False)


def worker_line(job: pruning_pb2.Job) -> str:
    """Where the job runs (scaled-out servers): its worker and lease, or ""."""
    if not job.worker:
        return ""
    line = f"worker: {job.worker}"
    if job.state == pruning_pb2.Job.STATE_RUNNING and job.HasField("lease_expire_time"):
        expires = job.lease_expire_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        line += f"  lease expires {expires} UTC"
    return line


def _watch(client: PruningClient, args: argparse.Namespace) -> int:
    """Follow a job to its end; its table and exit code."""
    from secateur.client.client import job_name

    return _wait_and_finish(client, job_name(args.job), args)


def _cancel(client: PruningClient, args: argparse.Namespace) -> int:
    """Cancel a queued or running job; print its state after."""
    from secateur.client.client import is_terminal, job_name

    job = client.cancel(job_name(args.job))
    state = enums.short_name(pruning_pb2.Job.State, job.state)
    note = (
        ""
        if job.state == pruning_pb2.Job.STATE_CANCELLED or not is_terminal(job)
        else " (had ended)"
    )
    print(f"{job.name} {state}{note}")
    return EXIT_OK


def _list(client: PruningClient, args: argparse.Namespace) -> int:
    """A table of jobs, newest first."""
    import itertools

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1. Received: {args.limit}")
    page = min(args.limit or 100, 100)
    jobs = list(itertools.islice(client.list(args.state, page_size=page), args.limit))
    print(jobs_table(jobs))
    return EXIT_OK


cmd_submit = _remote(_submit)
cmd_status = _remote(_status)
cmd_watch = _remote(_watch)
cmd_cancel = _remote(_cancel)
cmd_list = _remote(_list)
