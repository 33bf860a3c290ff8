"""A test hook: stop a job's process at a named point until the test lets it go.

With ``SECATEUR_TEST_HOLD_DIR`` set (never in production), a process that
reaches :func:`hold` at point P while the file ``<dir>/P`` exists writes
``<dir>/P.reached`` (its pid) and waits until the test removes ``<dir>/P``;
SIGTERM does not end the wait. Lifecycle tests use it to act at the exact
moment they mean (a cancel during EXPORTING, a worker stopped right after the
publish, a ``gs://`` publish killed before its ``saved_model.pb``) instead of
guessing it with sleeps. Points: ``exporting`` (before the last cancel check),
``fenced`` (the fence said yes, nothing published), ``published`` (the version
is complete, the job has not reported it), ``before_pb`` (a ``gs://`` commit
about to copy ``saved_model.pb``), ``tuned-<candidate>-<epochs done>`` (that
fine-tuning checkpoint is written: ``pipeline/checkpoint.py``).
"""

from __future__ import annotations

import os
import time

#: The directory of armed points; unset (no holds) outside tests.
HOLD_ENV = "SECATEUR_TEST_HOLD_DIR"


def hold(point: str) -> None:
    """Wait at ``point`` while the test armed it (see the module docstring)."""
    where = os.environ.get(HOLD_ENV)
    if not where or not os.path.exists(armed := os.path.join(where, point)):
        return
    with open(f"{armed}.reached", "w") as fh:
        fh.write(str(os.getpid()))
    while os.path.exists(armed):
        time.sleep(0.05)
