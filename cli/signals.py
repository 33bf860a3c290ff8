"""Ctrl-C and SIGTERM: how a local run stops, and how waiting on a server job stops."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI runner stopping the stage) handled like Ctrl-C while waiting."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopOnSignals:
    """SIGINT and SIGTERM for a local run, alike: the first asks the run to stop
    at its next check point (a training step, a stage, a data chunk), so that
    it unwinds and publishes nothing; a second one stops it at once.

    Called, it says whether a stop was asked (the job's ``should_cancel``).
    Nothing is printed from the handler: the progress bar may be mid-write.
    """

    def __init__(self) -> None:
        self.signal = ""

    def __call__(self) -> bool:
        return bool(self.signal)

    def what(self) -> str:
        return f"{self.signal}: " if self.signal else ""

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.signal:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    @contextmanager
    def installed(self) -> Iterator[None]:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
