"""Store writes that survive a store refusing them for a while (disk full, locked).

:meth:`StoreWriter.save` tries again after each of its delays, then raises:
the job manager fails the job. :meth:`StoreWriter.save_end` never raises: a
job's end is kept in memory at once (its watchers return, its slot frees)
and written in the background as soon as the store takes writes again.
"""

from __future__ import annotations

import asyncio
import logging

from secateur.server.errors import new_incident
from secateur.server.jobstore.interface import JobStore
from secateur.server.jobstore.records import JobRecord

log = logging.getLogger("secateur.server")


class StoreWriter:
    """Retrying writes to ``store``; ``delays`` are the pauses between tries."""

    def __init__(self, store: JobStore, delays: tuple[float, ...]) -> None:
        self.store = store
        self.delays = delays
        self._unsaved: set[str] = set()  # ended in memory, not yet in the store
        self._persister: asyncio.Task[None] | None = None

    async def save(self, record: JobRecord, durable: bool = True) -> None:
        """``store.save``, tried again after each delay; then raises.

        The store changes memory only once the database took the write, so a
        failure here leaves the two in agreement.
        """
        for delay in (*self.delays, None):
            try:
                self.store.save(record, durable=durable)
                return
            except Exception as exc:  # disk full, locked, I/O error
                if delay is None:
                    raise
                log.warning("storing job %s failed (%s); retrying in %.1f s", record.id, exc, delay)
                await asyncio.sleep(delay)

    async def save_end(self, record: JobRecord) -> None:
        """Store a job's end; never raises (see module docstring)."""
        try:
            await self.save(record)
            return
        except Exception as exc:  # see docstring
            log.error(
                "job %s ended %s but the store refused the write (incident %s); "
                "retrying in the background",
                record.id, record.state.value, new_incident(), exc_info=exc,
            )  # fmt: skip
        self.store.save(record, durable=False)
        self._unsaved.add(record.id)
        if self._persister is None or self._persister.done():
            self._persister = asyncio.create_task(self._persist_unsaved())

    async def _persist_unsaved(self) -> None:
        delay = max(self.delays, default=1.0)
        while self._unsaved:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)
            self._try_unsaved()

    def _try_unsaved(self) -> None:
        for job_id in list(self._unsaved):
            record = self.store.get(job_id)
            try:
                if record is not None:
                    self.store.save(record)
            except Exception as exc:  # noqa: BLE001 - still unwritable: later
                log.warning("storing the end of job %s failed again (%s)", job_id, exc)
            else:
                self._unsaved.discard(job_id)
                log.info("job %s: its end is stored now", job_id)

    def close(self) -> None:
        """Stop the background writer after a last try; a job still unsaved runs again."""
        if self._persister is not None:
            self._persister.cancel()
        self._try_unsaved()
        for job_id in self._unsaved:
            log.error("job %s: its end could not be stored", job_id)
