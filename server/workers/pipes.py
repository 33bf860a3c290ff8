"""Reading a worker's pipes without trusting what it writes.

A worker's stdout/stderr (TensorFlow chatter, tracebacks) and its events
descriptor are read in chunks and split into lines here, never with
``StreamReader.readline``: a line of any length (a 100 KB URI echoed in a
traceback) is cut, not raised on. A reader that died would stop draining the
pipe, the worker would block writing to it, and its job would never end —
so these readers log what goes wrong and keep draining to the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from secateur.server.errors import incident_message, new_incident

log = logging.getLogger("secateur.server")

CHUNK = 1 << 16
MAX_LOG_LINE = 4096  # bytes of one worker output line kept for the log
MAX_EVENT_LINE = 64 << 20  # an event or outcome larger than this is refused
TAIL_LINES = 40  # worker output lines kept for an incident report


async def lines(stream: asyncio.StreamReader, max_len: int) -> AsyncIterator[tuple[bytes, int]]:
    """The stream's lines without their newline, each cut to ``max_len`` bytes.

    Yields ``(line, dropped)``: ``dropped`` counts the bytes cut off the line.
    Memory stays bounded by ``max_len`` plus one chunk, whatever the input.
    """
    buf = bytearray()
    dropped = 0
    while chunk := await stream.read(CHUNK):
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start : end if end >= 0 else len(chunk)]
            room = max(max_len - len(buf), 0)
            buf += piece[:room]
            dropped += max(len(piece) - room, 0)
            if end < 0:
                break
            yield bytes(buf), dropped
            buf.clear()
            dropped = 0
            start = end + 1
    if buf or dropped:
        yield bytes(buf), dropped


class WorkerOutput:
    """A worker's merged stdout/stderr: logged line by line, its last lines kept."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    async def drain(self, stream: asyncio.StreamReader) -> None:
        """Log every line until EOF; never raises (see module docstring)."""
        try:
            async for line, dropped in lines(stream, MAX_LOG_LINE):
                self._log(line, dropped)
        except Exception:  # keep draining whatever happened
            log.exception("reading the output of worker %s failed; discarding the rest", self.key)
            await _discard(stream)

    def _log(self, line: bytes, dropped: int) -> None:
        text = line.decode(errors="replace").rstrip()
        if dropped:
            text += f" ... ({dropped} more bytes not logged)"
        if not text:
            return
        self.tail.append(text)
        log.debug("[worker %s] %s", self.key, text)
        if "Traceback" in text or "Error" in text:
            log.warning("[worker %s] %s", self.key, text)

    def tail_text(self) -> str:
        return "\n".join(self.tail) or "(no output)"


async def _discard(stream: asyncio.StreamReader) -> None:
    try:
        while await stream.read(CHUNK):
            pass
    except Exception:  # nothing more to read from a broken pipe
        log.exception("the output pipe of a worker broke")


async def reap(proc: asyncio.subprocess.Process, logs: asyncio.Task[None]) -> None:
    """Wait for a worker to exit and its output to be read to the end."""
    await proc.wait()
    _, pending = await asyncio.wait({logs}, timeout=10)  # a grandchild may hold the pipe
    for task in pending:
        task.cancel()


def parse_event(raw: bytes, dropped: int, key: str) -> dict[str, Any] | None:
    """A line from a worker's events descriptor; None (logged) when it is not a message."""
    if dropped:
        incident = new_incident()
        log.error(
            "worker %s sent a message of %d bytes, over the %d-byte limit (incident %s)",
            key, len(raw) + dropped, MAX_EVENT_LINE, incident,
        )  # fmt: skip
        what = "the worker's message was too large"
        return {"type": "error", "code": "INTERNAL", "incident": incident,
                "message": incident_message(what, incident)}  # fmt: skip
    try:
        msg = json.loads(raw)
    except ValueError:
        msg = None
    if not isinstance(msg, dict) or (
        msg.get("type") == "event" and not isinstance(msg.get("stage"), str)
    ):
        log.warning("worker %s sent a line that is not a message: %.200r", key, raw)
        return None
    return msg
