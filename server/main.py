"""``secateur serve``: flags -> ServerOptions -> serve().

Start-up problems (bad flags, an unreadable token file, a state database that
cannot be opened, a port in use) end the process with one line on stderr that
names the file or flag and what to do, and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

from secateur.pruner.safety import installed_packages
from secateur.server.api.service import ServerOptions, serve
from secateur.server.api.tenants import Tenants
from secateur.server.errors import StartupError
from secateur.server.workers.command import run_worker

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_MAX_MODEL_BYTES = 20 * 2**30
DEFAULT_MAX_JOB_SECONDS = 24 * 3600.0


def add_trust_argument(p: argparse.ArgumentParser) -> None:
    """``--trust-package``, shared by ``serve`` and ``worker``."""
    p.add_argument(
        "--trust-package",
        action="append",
        dest="trust_package",
        metavar="PACKAGE",
        help="an installed package (e.g. keras_hub) whose registered Keras classes a model "
        "file may name; the file still carries no code, and Lambda layers, serialised "
        "functions and other packages' classes stay refused (repeatable; default: Keras "
        "built-ins only)",
    )


STORE_ENV = "SECATEUR_STORE_URL"


def add_store_file_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store-url-file",
        metavar="FILE",
        help=f"a file holding the --store URL, password included (e.g. a mounted Kubernetes "
        f"Secret); or set ${STORE_ENV}, or keep the password in libpq's PGPASSFILE. The "
        "password never goes on a command line, and job processes see none of these",
    )


def store_url(args: argparse.Namespace) -> str:
    """The job store URL: ``--store``, ``--store-url-file`` or $SECATEUR_STORE_URL ("" if none).

    Raises:
        StartupError: a password in ``--store`` (every local user can read a
            command line), two sources at once, or an unreadable file.
    """
    given = [
        name
        for name, value in (("--store", args.store), ("--store-url-file", args.store_url_file))
        if value
    ]
    if len(given) > 1:
        raise StartupError("--store and --store-url-file go separately: pass one of them")
    if args.store:
        if urlsplit(args.store).password:
            raise StartupError(
                "refusing a password in --store: every user of this machine can read a "
                f"command line. Put the URL in a file (--store-url-file FILE), in ${STORE_ENV}, "
                "or the password in libpq's PGPASSFILE"
            )
        return str(args.store)
    if args.store_url_file:
        data = _read(args.store_url_file, "--store-url-file") or b""
        url = data.decode("utf-8", errors="replace").strip()
        if not url:
            raise StartupError(f"--store-url-file {args.store_url_file} is empty")
        return url
    return os.environ.get(STORE_ENV, "").strip()


def trusted_packages(args: argparse.Namespace) -> tuple[str, ...]:
    """``--trust-package``, each checked to be installed (imported by the job processes).

    Raises:
        StartupError: a package that is not installed here.
    """
    try:
        return installed_packages(args.trust_package or ())
    except ValueError as exc:
        raise StartupError(str(exc)) from exc


def add_model_cap_argument(p: argparse.ArgumentParser) -> None:
    """``--max-model-bytes`` and ``--max-job-seconds``, shared by ``serve`` and ``worker``."""
    p.add_argument(
        "--max-job-seconds",
        type=float,
        default=DEFAULT_MAX_JOB_SECONDS,
        help="a job run's wall-time limit and the most a spec's max_run_seconds may ask; a job "
        f"past it ends FAILED DEADLINE_EXCEEDED; 0: none (default {DEFAULT_MAX_JOB_SECONDS:g}, "
        "24 h)",
    )
    p.add_argument(
        "--max-model-bytes",
        type=int,
        default=DEFAULT_MAX_MODEL_BYTES,
        help="a job's model download (local or gs://) stops past this many bytes, counted "
        "while streaming: the job FAILS RESOURCE_EXHAUSTED and no partial copy is kept; "
        f"0: no cap (default {DEFAULT_MAX_MODEL_BYTES}, 20 GiB)",
    )


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """The bounds of one replica's resources (issue 18, item 7)."""
    add_model_cap_argument(p)
    p.add_argument(
        "--max-queued-jobs",
        type=int,
        default=100,
        help="jobs waiting at once; beyond it CreateJob answers RESOURCE_EXHAUSTED (default 100)",
    )
    p.add_argument(
        "--max-concurrent-plans",
        type=int,
        default=2,
        help="PlanPruning and validate-only CreateJob calls run at once by this replica (each "
        "a TensorFlow process); beyond it RESOURCE_EXHAUSTED with RetryInfo (default 2)",
    )


def add_auth_arguments(p: argparse.ArgumentParser) -> None:
    """Who may call: TLS, mTLS, bearer tokens (issue 18, items 8 and 9)."""
    p.add_argument("--tls-cert", help="PEM server certificate (enables TLS)")
    p.add_argument("--tls-key", help="PEM server private key")
    p.add_argument("--tls-client-ca", help="PEM CA for client certificates (enables mTLS)")
    p.add_argument(
        "--auth-token-file",
        help="accepted bearer tokens: one per line, or a YAML `tenants:` mapping of tenant -> "
        "tokens and allowed_uri_prefixes, each tenant seeing only its own jobs "
        "(docs/tenants.md); read again on SIGHUP",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen on a non-loopback --host without tokens or mTLS (only on a network "
        "where every client is trusted)",
    )
    p.add_argument(
        "--allow-plaintext-tokens",
        action="store_true",
        help="accept bearer tokens on a non-loopback --host without --tls-cert (they cross the "
        "network readable by anyone on the path; only behind a TLS-terminating proxy or mesh)",
    )


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only); any other address "
        "needs --auth-token-file or --tls-client-ca, or --allow-unauthenticated",
    )
    p.add_argument(
        "--metrics-port", type=int, default=9464, help="Prometheus /metrics port; -1 disables"
    )
    p.add_argument(
        "--state-dir", default=os.path.expanduser("~/.secateur"), help="jobs database and work dirs"
    )
    p.add_argument(
        "--allowed-uri-prefix",
        action="append",
        help="only read/write URIs under these prefixes (repeatable; default: the state dir's "
        "'models' folder, so nothing else is reachable until you allow it)",
    )
    p.add_argument(
        "--store",
        help="where jobs live: sqlite:///PATH (default: sqlite:///<state-dir>/jobs.sqlite, jobs "
        "run by this process) or postgresql://USER@HOST:PORT/DB (shared by replicas and "
        "`secateur worker`s); a URL with a password is refused here, see --store-url-file",
    )
    add_store_file_argument(p)
    p.add_argument(
        "--max-concurrent-jobs",
        type=int,
        default=1,
        help="jobs this process runs at once (with a postgresql --store, 0: API only; with "
        "SQLite, 0 queues jobs that nothing runs: tests and benchmarks only; default 1)",
    )
    add_limit_arguments(p)
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=30.0,
        help="with a postgresql --store: the lease of jobs this process runs, as secateur "
        "worker's --lease-seconds (default 30)",
    )
    add_auth_arguments(p)
    p.add_argument(
        "--shutdown-grace-seconds",
        type=float,
        default=5.0,
        help="on SIGTERM/SIGINT, report NOT_SERVING this long while calls are still "
        "answered, then stop (a second signal stops at once; default 5)",
    )
    add_trust_argument(p)
    p.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``localhost``, 127/8, ``::1``)."""
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable


def exposure_problem(args: argparse.Namespace) -> str | None:
    """Why these flags would expose an unauthenticated server; None when they don't."""
    if is_loopback(args.host) or args.auth_token_file or args.tls_client_ca:
        return None
    if args.allow_unauthenticated:
        return None
    return (
        f"refusing to listen on {args.host or 'all interfaces'} without authentication: pass "
        "--auth-token-file FILE (bearer tokens) or --tls-cert/--tls-key/--tls-client-ca "
        "(mutual TLS), or --allow-unauthenticated if every client that can reach it is "
        f"trusted. Received: --host {args.host!r}"
    )


def plaintext_token_problem(args: argparse.Namespace) -> str | None:
    """Why these flags would send bearer tokens in clear text; None when they don't."""
    if not args.auth_token_file or args.tls_cert or is_loopback(args.host):
        return None
    if args.allow_plaintext_tokens:
        return None
    return (
        f"refusing bearer tokens on {args.host or 'all interfaces'} without TLS: anyone on the "
        "network path could read them. Pass --tls-cert/--tls-key, or --allow-plaintext-tokens "
        "if a proxy or service mesh in front of this server terminates TLS. "
        f"Received: --host {args.host!r} --auth-token-file without --tls-cert"
    )


def _read(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise StartupError(
            f"cannot read {flag} {path}: {exc.strerror or exc}; check the path and its permissions"
        ) from exc


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """Check the flags and read the files they name; StartupError if they won't do."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise StartupError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise StartupError("--tls-client-ca needs --tls-cert/--tls-key")
    if not args.shutdown_grace_seconds >= 0:  # also refuses nan
        raise StartupError(
            f"--shutdown-grace-seconds must be >= 0. Received: {args.shutdown_grace_seconds}"
        )
    if not args.lease_seconds >= 1:
        raise StartupError(f"--lease-seconds must be >= 1. Received: {args.lease_seconds}")
    if args.max_concurrent_jobs < 0:
        raise StartupError(
            f"--max-concurrent-jobs must be >= 0. Received: {args.max_concurrent_jobs}"
        )
    if not args.max_job_seconds >= 0:
        raise StartupError(f"--max-job-seconds must be >= 0. Received: {args.max_job_seconds}")
    if args.max_model_bytes < 0:
        raise StartupError(f"--max-model-bytes must be >= 0. Received: {args.max_model_bytes}")
    if args.max_concurrent_plans < 1:
        raise StartupError(
            f"--max-concurrent-plans must be >= 1. Received: {args.max_concurrent_plans}"
        )
    problem = exposure_problem(args) or plaintext_token_problem(args)
    if problem:
        raise StartupError(problem)
    tenants = Tenants(args.auth_token_file) if args.auth_token_file else None
    state_dir = os.path.abspath(os.path.expanduser(args.state_dir))
    allowed = tuple(args.allowed_uri_prefix or [os.path.join(state_dir, "models")])
    return ServerOptions(
        state_dir=state_dir,
        port=args.port,
        host=args.host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        allowed_prefixes=allowed,
        max_concurrent_jobs=args.max_concurrent_jobs,
        max_queued_jobs=args.max_queued_jobs,
        tenants=tenants,
        tls_cert=_read(args.tls_cert, "--tls-cert"),
        tls_key=_read(args.tls_key, "--tls-key"),
        tls_client_ca=_read(args.tls_client_ca, "--tls-client-ca"),
        shutdown_grace_s=args.shutdown_grace_seconds,
        store_url=store_url(args),
        lease_s=args.lease_seconds,
        trusted_packages=trusted_packages(args),
        max_concurrent_plans=args.max_concurrent_plans,
        max_model_bytes=args.max_model_bytes or None,
        max_job_seconds=args.max_job_seconds or None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="secateur serve", description="Run the pruning service.")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        options = options_from_args(args)
        if options.max_concurrent_jobs == 0 and not options.store_url.startswith("postgres"):
            logging.getLogger("secateur.server").warning(
                "--max-concurrent-jobs 0 with the embedded SQLite store: jobs are queued and "
                "NOTHING runs them (no worker can reach this store); for tests and benchmarks "
                "only. An API-only replica needs a shared postgresql:// --store"
            )
        if options.trusted_packages:
            logging.getLogger("secateur.server").info(
                "model files may name the registered classes of: %s (--trust-package)",
                ", ".join(options.trusted_packages),
            )
        if not is_loopback(options.host) and not (options.tenants or options.tls_client_ca):
            logging.getLogger("secateur.server").warning(
                "--allow-unauthenticated: anyone who can reach %s:%d may use this server",
                options.host,
                options.port,
            )
        return serve(options)
    except StartupError as exc:
        print(f"secateur serve: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        help=f"the shared job store: postgresql://USER@HOST:PORT/DB (a URL with a password "
        f"is refused here: use --store-url-file or ${STORE_ENV})",
    )
    add_store_file_argument(p)
    p.add_argument(
        "--state-dir", default=os.path.expanduser("~/.secateur"), help="work dirs of running jobs"
    )
    p.add_argument(
        "--allowed-uri-prefix",
        action="append",
        help="only read/write URIs under these prefixes (repeatable; default: the state dir's "
        "'models' folder)",
    )
    p.add_argument("--max-concurrent-jobs", type=int, default=1, help="jobs run at once")
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=30.0,
        help="a running job's lease, renewed every third of it; another worker reclaims the "
        "job when it expires (default 30)",
    )
    p.add_argument("--max-attempts", type=int, default=3, help="a job's attempts before it fails")
    add_model_cap_argument(p)
    p.add_argument(
        "--max-preemptions",
        type=int,
        default=10,
        help="runs of a job after which one more stop by a worker shutdown (SIGTERM: "
        "scale-down, preemption) ends it FAILED instead of queueing it again (default 10)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=-1, help="Prometheus /metrics port; -1 disables"
    )
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of /metrics")
    p.add_argument("--worker-id", help="this worker's name in jobs (default: hostname-pid)")
    add_trust_argument(p)
    p.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")


def worker_main(argv: Sequence[str] | None = None) -> int:
    """``secateur worker``: claim and run jobs of a shared store until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="secateur worker", description="Run jobs of a shared (PostgreSQL) job store."
    )
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args.store = store_url(args)
    except StartupError as exc:
        print(f"secateur worker: {exc}", file=sys.stderr, flush=True)
        return 2
    problem = _worker_problem(args)
    if problem:
        print(f"secateur worker: {problem}", file=sys.stderr, flush=True)
        return 2
    try:
        return asyncio.run(run_worker(args))
    except StartupError as exc:
        print(f"secateur worker: {exc}", file=sys.stderr, flush=True)
        return 2


def _worker_problem(args: argparse.Namespace) -> str | None:
    if not args.store.startswith(("postgresql://", "postgres://")):
        return (
            "--store (or --store-url-file, $SECATEUR_STORE_URL) must be a shared "
            "postgresql://USER@HOST:PORT/DB store (SQLite jobs are run by `secateur serve` "
            f"itself). Received: {_redacted(args.store)!r}"
        )
    if args.max_concurrent_jobs < 1:
        return f"--max-concurrent-jobs must be >= 1. Received: {args.max_concurrent_jobs}"
    if not args.lease_seconds >= 1:
        return f"--lease-seconds must be >= 1. Received: {args.lease_seconds}"
    if args.max_preemptions < 1:
        return f"--max-preemptions must be >= 1. Received: {args.max_preemptions}"
    try:
        installed_packages(args.trust_package or ())
    except ValueError as exc:
        return str(exc)
    return None


def _redacted(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
