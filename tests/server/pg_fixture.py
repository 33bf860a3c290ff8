"""A real PostgreSQL server for tests, from Debian's ``postgresql`` package.

:func:`run_postgres` runs ``initdb`` and ``pg_ctl`` (as the ``postgres``
user when the tests run as root: PostgreSQL refuses to run as root) on a
fresh directory under /tmp, listening on a free 127.0.0.1 port with trust
authentication and its Unix socket inside that directory. Fixtures::

    from tests.server.pg_fixture import pg_server_fixture, pg_url_fixture  # noqa: F401

    def test_x(pg_url):  # a fresh, empty database of its own
        store = PostgresJobStore(pg_url)

``pg_server`` (session scoped) is the running :class:`PostgresServer`; its
:meth:`~PostgresServer.restart`, :meth:`~PostgresServer.stop` and
:meth:`~PostgresServer.start` serve the "PostgreSQL restarted mid-job" tests
(the port and data survive). ``pg_url`` creates a new database per test.
The binaries are looked up in ``$PG_BINDIR``, then on PATH, then in
``/usr/lib/postgresql/<version>/bin``; when none is found or the server does
not start, tests that use these fixtures skip and say why (``make
system-deps`` installs the package when run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "PostgresServer",
    "pg_bindir",
    "pg_server_fixture",
    "pg_url_fixture",
    "run_postgres",
]

USER = "postgres"


def pg_bindir() -> str | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(os.path.dirname(os.path.realpath(on_path)))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        if folder and all(
            os.access(os.path.join(folder, tool), os.X_OK)
            for tool in ("initdb", "pg_ctl", "postgres")
        ):
            return folder
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_postgres(argv: list[str]) -> list[str]:
    """``argv`` run as the ``postgres`` user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", USER, "--", *argv]


@dataclass
class PostgresServer:
    """A running PostgreSQL cluster on 127.0.0.1:``port``."""

    bindir: str
    datadir: Path
    port: int
    log_path: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _pg_ctl(self, *args: str, timeout: float = 60.0) -> None:
        argv = [f"{self.bindir}/pg_ctl", "-D", str(self.datadir), "-l", str(self.log_path)]
        done = subprocess.run(
            _as_postgres([*argv, *args]),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"pg_ctl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}\n"
                f"server log:\n{self.log_tail()}"
            )

    def start(self) -> None:
        """Start the server (again) on the same port and data; returns once it accepts."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.datadir.parent} -c max_connections=400 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._pg_ctl("start", "-w", "-t", "60", "-o", options)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate — a crash)."""
        self._pg_ctl("stop", "-w", "-t", "60", "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again: every client connection is dropped."""
        self.stop(mode)
        self.start()

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # name is ours, never user input
        return self.url(name)


@contextmanager
def run_postgres() -> Iterator[PostgresServer]:
    """Initialise and start a throwaway cluster; stopped and deleted on exit.

    Raises:
        RuntimeError: the binaries are missing or the server does not start
            (the message carries pg_ctl's output and the server log).
    """
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found")
    root = Path(tempfile.mkdtemp(prefix="secateur-pg-"))
    try:
        os.chmod(root, 0o755)
        if os.geteuid() == 0:
            shutil.chown(root, USER, USER)
        datadir = root / "data"
        initdb = [f"{bindir}/initdb", "-D", str(datadir), "-U", USER, "-A", "trust"]
        done = subprocess.run(
            _as_postgres([*initdb, "-E", "UTF8", "--no-sync"]),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr.strip()}")
        server = PostgresServer(bindir, datadir, 0, root / "postgres.log")
        _start_on_free_port(server)
        reaper = _reaper(server, root)
        try:
            yield server
        finally:
            reaper.kill()
            reaper.wait()
            try:
                server.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
    finally:
        shutil.rmtree(root, ignore_errors=True)


# Waits for the test process ($0) to end, then stops the cluster and deletes it.
REAPER = 'while kill -0 "$0" 2>/dev/null; do sleep 2; done; "$@" >/dev/null 2>&1; rm -rf "$ROOT"'


def _reaper(server: PostgresServer, root: Path) -> subprocess.Popen[bytes]:
    """A watcher that stops the server should this process die without cleaning up
    (killed by a timeout): a pg_ctl server does not die with its parent."""
    stop = _as_postgres([f"{server.bindir}/pg_ctl", "-D", str(server.datadir), "stop", "-m", "i"])
    return subprocess.Popen(
        ["sh", "-c", REAPER, str(os.getpid()), *stop],
        env={**os.environ, "ROOT": str(root)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _start_on_free_port(server: PostgresServer) -> None:
    """Start on a free port, retrying when another process takes it first."""
    last: Exception | None = None
    for _ in range(3):
        server.port = _free_port()
        try:
            server.start()
            return
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            last = exc
    raise RuntimeError(f"PostgreSQL did not start: {last}")


@pytest.fixture(name="pg_server", scope="session")
def pg_server_fixture() -> Iterator[PostgresServer]:
    """One PostgreSQL for the session, or skip saying why it cannot run."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'psycopg[binary]' psycopg-pool)")
    if pg_bindir() is None:
        pytest.skip(
            "PostgreSQL not found: apt-get install postgresql (make system-deps), "
            "or set PG_BINDIR to the folder holding initdb and pg_ctl"
        )
    try:
        context = run_postgres()
        server = context.__enter__()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"PostgreSQL could not be started: {exc}")
    try:
        yield server
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(name="pg_url")
def pg_url_fixture(pg_server: PostgresServer) -> str:
    """The URL of a new, empty database on the session's PostgreSQL."""
    return pg_server.create_database()
