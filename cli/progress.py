"""Progress on stderr: a ``rich`` bar on a terminal, plain heartbeat lines elsewhere.

One :class:`ProgressDisplay` follows one run. It takes pipeline events
(``secateur prune``: ``stage``, ``progress``, ``message``, ``detail`` and the
overall fraction ``overall``), ``secateur.v1.Job`` snapshots (``submit
--wait``, ``watch``, ``demo``) or plain ``update(stage, fraction, message)``
calls (the demo's pre-training). The overall fraction shown never goes back.

When the stream is not a terminal (CI logs) it writes one line per change of
stage or step and, while nothing changes, a heartbeat line (stage, overall
percent, elapsed time) every ``heartbeat_s`` seconds, so a long stage never
looks hung.

Imports protobuf and ``rich`` only.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from secateur.v1 import enums, pruning_pb2

HEARTBEAT_S = 10.0


def elapsed_text(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    s = int(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _job_stage(job: pruning_pb2.Job) -> str:
    if job.state == pruning_pb2.Job.STATE_RUNNING and job.stage:
        return enums.short_name(pruning_pb2.Job.Stage, job.stage)
    return enums.short_name(pruning_pb2.Job.State, job.state)


def _step_text(detail: dict[str, Any]) -> str:
    if "step" not in detail:
        return ""
    loss = detail.get("loss")
    text = f"epoch {detail['epoch']}/{detail['epochs']} step {detail['step']}"
    if detail.get("steps"):
        text += f"/{detail['steps']}"
    return text + (f" loss {loss:.3f}" if loss is not None else "")


class ProgressDisplay:
    """See the module docstring.

    Args:
        stream: where to draw (default ``sys.stderr``).
        heartbeat_s: the longest silence on a non-terminal stream.
        tty: force terminal (True) or plain (False) output; default: ask the stream.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        stream: Any = None,
        heartbeat_s: float = HEARTBEAT_S,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)() if tty is None else tty
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self.start: float | None = None  # the first update
        self.fraction = 0.0
        self.stage = ""
        self.message = ""
        self._key: tuple[str, str] | None = None
        self._last_line = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rich: Any = None
        self._task: Any = None

    # -- inputs --------------------------------------------------------------
    def __call__(self, event: Any) -> None:
        """A pipeline ``StageEvent`` (``secateur prune``)."""
        overall = getattr(event, "overall", None)
        step = _step_text(event.detail)
        message = " ".join(p for p in (event.message, step) if p)
        self.update(event.stage, event.progress if overall is None else overall, message, step)

    def job(self, job: pruning_pb2.Job) -> None:
        """A job snapshot from the server."""
        message = job.message
        stage = _job_stage(job)
        if message.lower().startswith(stage.lower() + ":"):
            message = message[len(stage) + 1 :].strip()
        self.update(stage, job.progress, message)

    def update(self, stage: str, fraction: float, message: str = "", step: str = "") -> None:
        """Show ``stage`` at ``fraction`` of the whole run (clamped, never backwards).

        ``step`` names a step-level detail of ``message``: on a plain stream a
        change in it alone does not print a line (the heartbeat covers it).
        """
        with self._lock:
            if self.start is None:
                self.start = self._last_line = self.clock()
            self.fraction = max(self.fraction, min(max(fraction, 0.0), 1.0))
            self.stage, self.message = stage, message
            key = (stage, message.removesuffix(step).strip() if step else message)
            changed, self._key = key != self._key, key
            if self.tty:
                self._draw()
            elif changed:
                self._write_line()
        self._start_heartbeat()

    # -- output --------------------------------------------------------------
    def line(self) -> str:
        """The plain line: stage, overall percent, elapsed, message."""
        elapsed = elapsed_text(self.clock() - (self.start or self.clock()))
        return f"{self.stage:<11} {self.fraction:4.0%}  {elapsed:>7}  {self.message}".rstrip()

    def _write_line(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._last_line = self.clock()

    def _draw(self) -> None:
        if self._rich is None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(file=self.stream, force_terminal=True)
            self._rich = Progress(
                TextColumn("{task.fields[stage]:<11}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=console,
            )
            self._rich.start()
            self._task = self._rich.add_task("", total=1.0, stage="")
        self._rich.update(
            self._task, completed=self.fraction, description=self.message, stage=self.stage
        )

    def _start_heartbeat(self) -> None:
        if self.tty or self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._beat, name="secateur-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s / 4):
            with self._lock:
                if self.clock() - self._last_line >= self.heartbeat_s:
                    self._write_line()

    def close(self) -> None:
        """Stop the heartbeat; end the bar's line on a terminal."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._rich is not None:
                self._rich.stop()
                self._rich = None

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
