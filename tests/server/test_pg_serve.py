"""``secateur serve``'s flags for a shared store: the in-process worker's lease
(--lease-seconds), refused values, and the loud warning of a SQLite server that
runs nothing (--max-concurrent-jobs 0)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from secateur.server.main import main
from secateur.server.service import BackgroundServer, ServerOptions


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--lease-seconds", "0.5"], "--lease-seconds must be >= 1. Received: 0.5"),
        (["--lease-seconds", "nan"], "--lease-seconds must be >= 1. Received: nan"),
        (["--max-concurrent-jobs", "-1"], "--max-concurrent-jobs must be >= 0. Received: -1"),
    ],
)
def test_serve_badFlag_exits2NamingIt(
    flags: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    assert main(["--port", "0", "--state-dir", str(state), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"secateur serve: {said}"
    assert not state.exists()


def test_serve_leaseSeconds_reachesTheInProcessWorker(pg_url: str, tmp_path: Path) -> None:
    options = ServerOptions(
        state_dir=str(tmp_path), port=0, store_url=pg_url, max_concurrent_jobs=1, lease_s=7.0
    )
    with BackgroundServer(options) as server:
        manager = server.running.manager
        assert manager is not None and manager.worker_loop is not None
        assert manager.worker_loop.cfg.lease_s == 7.0


def test_serve_sqliteRunningNothing_warnsLoudly(tmp_path: Path) -> None:
    out, err = tmp_path / "out", tmp_path / "err"
    argv = [sys.executable, "-m", "secateur.server.main", "--port", "0", "--metrics-port", "-1"]
    argv += ["--state-dir", str(tmp_path / "state"), "--max-concurrent-jobs", "0"]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(argv, stdout=o, stderr=e)
    try:
        deadline = time.monotonic() + 60
        while "secateur serving on" not in out.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()
            time.sleep(0.1)
        warning = [line for line in err.read_text().splitlines() if "WARNING" in line]
        assert len(warning) == 1 and "NOTHING runs them" in warning[0], warning
        assert "postgresql://" in warning[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
