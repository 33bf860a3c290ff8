"""Job-change notifications from PostgreSQL: LISTEN on a thread, with a polling floor.

Every write of :class:`~secateur.server.jobstore.postgres.PostgresJobStore` sends
``NOTIFY secateur_jobs, '<job id>'`` in its transaction (delivered at commit,
to every replica). One :class:`Listener` thread per store holds a dedicated
autocommit connection that LISTENs and calls each subscriber with the job id.

Notifications are lost while that connection is down (a PostgreSQL restart,
a network cut), so subscribers are ALSO called with ``None`` — "anything may
have changed, read again" — on every (re)connect and at least every
``poll_s`` seconds whatever happens: a watcher is never more than ``poll_s``
late, and is usually woken within milliseconds. The connection is re-opened
with a capped exponential backoff. ``on_connection(True)`` is called once
LISTEN runs (before the ``None`` of that connect), ``on_connection(False)``
when the connection is lost: a cache kept fresh by the notifications
(server/jobstore/cache.py) is only trusted in between.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from secateur.server.jobstore.schema import CHANNEL

log = logging.getLogger("secateur.server")

#: ``callback(job_id)``; ``None`` means "any job may have changed".
Subscriber = Callable[[str | None], None]


class Listener:
    """A daemon thread that LISTENs on ``url`` and calls subscribers (see module docstring)."""

    def __init__(
        self,
        url: str,
        poll_s: float = 2.0,
        max_backoff_s: float = 2.0,
        on_connection: Callable[[bool], None] | None = None,
    ) -> None:
        self.url = url
        self._on_connection = on_connection
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_tick = time.monotonic()
        self.connected = threading.Event()  # set while LISTENing (tests wait on it)
        self.connects = 0  # how many times LISTEN started
        self._thread = threading.Thread(target=self._run, name="secateur-pg-listen", daemon=True)
        self._thread.start()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` on every change; returns the function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _fire(self, job_id: str | None) -> None:
        if job_id is None:
            self._last_tick = time.monotonic()
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(job_id)
            except Exception:  # a subscriber's bug must not stop the others
                log.exception("a job-change subscriber failed")

    def _tick(self) -> None:
        if time.monotonic() - self._last_tick >= self.poll_s:
            self._fire(None)

    def _run(self) -> None:
        import psycopg

        backoff = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._connection(True)
                    self._fire(None)  # changes may have happened while not listening
                    backoff = 0.1
                    self._listen(conn)
            except psycopg.Error as exc:
                if self.connected.is_set():
                    log.warning("job notifications stopped (%s); reconnecting", exc)
            if self.connected.is_set():
                self._connection(False)
            deadline = time.monotonic() + backoff
            while not self._stop.is_set() and time.monotonic() < deadline:
                self._tick()
                self._stop.wait(min(0.2, self.poll_s))
            backoff = min(backoff * 2, self.max_backoff_s)

    def _connection(self, up: bool) -> None:
        if self._on_connection is not None:
            try:
                self._on_connection(up)
            except Exception:  # a hook's bug must not stop the listener
                log.exception("a job-notification connection hook failed")
        if up:
            self.connects += 1
            self.connected.set()
        else:
            self.connected.clear()

    def _listen(self, conn: object) -> None:
        while not self._stop.is_set():
            for notify in conn.notifies(timeout=0.25):  # type: ignore[attr-defined]
                self._fire(notify.payload)
            self._tick()
