"""`secateur prune` stopped by SIGTERM or SIGINT mid-fine-tuning: exit 4, nothing published."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from secateur.cli.outcome import EXIT_CANCELLED


def _start_and_wait_for_fine_tuning(digits_data, out) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "secateur.cli", "prune", digits_data.model_path, str(out),
         "--ratio", "0.3", "--epochs", "50", "--batch-size", "32",
         "--train-data", digits_data.train_glob, "--measure-steps", "1"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    watchdog = threading.Timer(300, proc.kill)  # never hang the suite
    watchdog.daemon = True
    watchdog.start()
    lines: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:  # the progress output, one plain line per stage when piped
        lines.append(line)
        if "FINE_TUNING" in line:
            return proc, lines
    raise AssertionError(f"never reached FINE_TUNING: {''.join(lines)}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_prune_signalDuringFineTuning_exit4_nothingPublished(digits_data, tmp_path, sig) -> None:
    out = tmp_path / "served"
    proc, lines = _start_and_wait_for_fine_tuning(digits_data, out)
    time.sleep(1.0)  # well inside training: 50 epochs take minutes
    sent = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CANCELLED, "".join(lines) + stderr
    assert time.monotonic() - sent < 60  # stopped at the next step, not after training
    assert "nothing was published" in stderr and sig.name in stderr
    assert "Traceback" not in stderr
    assert not out.exists() or list(out.iterdir()) == []  # no version, no .tmp- leftovers


def test_prune_secondSignal_stopsAtOnce_exit4(digits_data, tmp_path) -> None:
    out = tmp_path / "served"
    proc, _ = _start_and_wait_for_fine_tuning(digits_data, out)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CANCELLED, stderr
    assert "Traceback" not in stderr
    assert not out.exists() or list(out.iterdir()) == []
