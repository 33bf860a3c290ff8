"""Jobs and their queue in PostgreSQL, shared by any number of replicas and workers.

:class:`PostgresJobStore` is a :class:`~secateur.server.jobstore.interface.JobStore` (the
API replicas' reads and writes) and a :class:`~secateur.server.jobstore.interface.QueueStore`
(the workers' leases). It keeps nothing in memory: every call reads or writes
the database through a psycopg connection pool, so any replica answers for
any job. Rows hold the ``secateur.v1.Job`` bytes and the report JSON as
SqliteJobStore does, beside the columns the queue works on (state, worker,
lease expiry, fencing token, attempts, cancel flag, version); the schema is
migrated on open (server/jobstore/schema.py).

- Idempotency across replicas is the ``request_id`` UNIQUE constraint
  (``INSERT ... ON CONFLICT DO NOTHING``), never a process-local check.
- Workers claim with ``SELECT ... FOR UPDATE SKIP LOCKED``: two claimers never
  get the same job. Each claim increments the job's ``lease_token``; every
  write a worker makes afterwards (:meth:`save_leased`, :meth:`fence`) names
  its token and is refused once another claim superseded it, so a zombie
  worker can neither overwrite nor publish.
- Watchers: every write NOTIFYs ``secateur_jobs`` with the job id in its
  transaction; :meth:`subscribe` hears them through one LISTEN thread per
  store, and ALSO gets ``None`` ("read again") on reconnects and at least
  every 2 s, because notifications are lost while PostgreSQL restarts
  (server/jobstore/listen.py). Lease renewals do not notify (they change nothing a
  watcher shows but the expiry, and would wake every watcher each renewal).
- A PostgreSQL restart: the pool checks each connection before lending it
  (``ConnectionPool.check_connection``) and opens new ones, so the next call
  works once the server is back; a call in flight fails with
  :class:`StoreUnavailableError` (gRPC UNAVAILABLE), which callers retry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import grpc

from secateur.server.jobstore import jobs_pb
from secateur.server.jobstore.codec import decode_row, encode_row, given_up, quarantined, taken
from secateur.server.jobstore.interface import Claim, Lease, StoreOpenError
from secateur.server.jobstore.listen import Listener, Subscriber
from secateur.server.jobstore.records import JobError, JobRecord, JobState, now_ns
from secateur.server.jobstore.schema import CHANNEL, migrate, shared_secret

log = logging.getLogger("secateur.server")

# The columns a record is read from, in _record's order.
COLUMNS = (
    "id, data, report, worker, extract(epoch FROM lease_expires)::float8, "
    "request_id, create_ns, attempts"
)
_NUM = {state: jobs_pb.state_number(state) for state in JobState}
_STATE = {number: state for state, number in _NUM.items()}
# Sets the stored columns of a record (parameters: state, data, report, attempts, id).
_WRITE = (
    "state = %s, data = %s, report = %s, attempts = %s, update_time = now(), "
    "version = version + 1, lease_expires = CASE WHEN %s THEN NULL ELSE lease_expires END"
)
_NOTIFY = "SELECT pg_notify(%s, %s)"
_CLAIMABLE = (
    f"SELECT {COLUMNS}, state, cancel_requested, publish_uri FROM jobs "
    "WHERE state = %s OR (state = %s AND lease_expires < now()) "
    "ORDER BY create_ns LIMIT 1 FOR UPDATE SKIP LOCKED"
)


class StoreUnavailableError(Exception):
    """PostgreSQL did not answer (down, restarting, unreachable); try again later."""


class DuplicateRequestError(Exception):
    """Another job already has this ``request_id``; ``existing`` is that job."""

    def __init__(self, existing: JobRecord) -> None:
        super().__init__(f"job {existing.id} already has request_id {existing.request_id!r}")
        self.existing = existing


class PostgresJobStore:
    """Jobs and the work queue in the PostgreSQL database at ``url`` (see module docstring).

    Args:
        url: ``postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE``.
        pool_size: the most connections this store opens at once.
        poll_s: subscribers hear ``None`` at least this often.
        connect_timeout_s: how long opening waits for the server.

    Raises:
        StoreOpenError: the server cannot be reached or the schema not created;
            the message names the server and what to check.
    """

    def __init__(
        self, url: str, pool_size: int = 10, poll_s: float = 2.0, connect_timeout_s: float = 10.0
    ) -> None:
        import psycopg
        from psycopg_pool import PoolTimeout

        self.url = url
        self._poll_s = poll_s
        self._pool_size = max(1, pool_size)
        self._timeout_s = connect_timeout_s
        self._listener: Listener | None = None
        self._swap = threading.Lock()
        self._stale = False  # the pool timed out: the next call starts a new one
        self._pool = self._new_pool()
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
            with self._pool.connection() as conn:
                applied = migrate(conn)
        except (psycopg.Error, PoolTimeout) as exc:
            self._pool.close()
            raise StoreOpenError(
                f"cannot open the job database at {_safe(url)} ({str(exc).strip()}): check "
                "that PostgreSQL runs there, that the database exists and that the user "
                "may create tables in it"
            ) from exc
        if applied:
            log.info("job database %s: schema migrations %s applied", _safe(url), applied)

    def _new_pool(self) -> Any:
        from psycopg_pool import ConnectionPool

        return ConnectionPool(
            self.url,
            min_size=1,
            max_size=self._pool_size,
            open=False,
            timeout=self._timeout_s,
            check=ConnectionPool.check_connection,  # a connection dead since a restart: replaced
            # Autocommit: a read is one round trip; writes open their transaction (_tx).
            kwargs={"connect_timeout": max(1, int(self._timeout_s)), "autocommit": True},
            name="secateur-jobs",
        )

    def _current_pool(self) -> Any:
        """The pool; a new one after a timeout. A pool that failed to connect backs
        off exponentially (1, 2, 4, ... s), so after a long outage it could stay
        down long after PostgreSQL is back; a new pool connects at once."""
        with self._swap:
            if self._stale:
                old, self._pool, self._stale = self._pool, self._new_pool(), False
                self._pool.open(wait=False)
                threading.Thread(target=old.close, args=(1.0,), daemon=True).start()
            return self._pool

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Any]:
        """A pooled connection in a transaction (committed on exit), or for a single
        read statement none (autocommit: no BEGIN/COMMIT round trips); errors typed."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with (
                self._current_pool().connection() as conn,
                conn.transaction() if write else nullcontext(),
            ):
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            if isinstance(exc, PoolTimeout):
                self._stale = True
            raise StoreUnavailableError(
                f"the job database at {_safe(self.url)} did not answer ({str(exc).strip()}); "
                "retry in a few seconds"
            ) from exc

    # -- JobStore ------------------------------------------------------------
    def insert(self, record: JobRecord) -> None:
        """Store a new job.

        Raises:
            DuplicateRequestError: a job with its ``request_id`` exists (any replica's).
        """
        stored = self.insert_or_existing(record)
        if stored is not record:
            raise DuplicateRequestError(stored)

    def insert_or_existing(self, record: JobRecord) -> JobRecord:
        """Store a new job; or, when its ``request_id`` is taken, the job that has it."""
        state, data, report = encode_row(record)
        with self._tx() as conn:
            inserted = conn.execute(
                "INSERT INTO jobs (id, request_id, state, create_ns, create_time, data, report,"
                " attempts, tenant) VALUES (%s, %s, %s, %s, to_timestamp(%s), %s, %s, %s, %s)"
                " ON CONFLICT (request_id) DO NOTHING RETURNING id",
                (
                    record.id, record.request_id or None, state, record.create_ns,
                    record.create_ns / 1e9, data, report, record.attempts, record.tenant,
                ),
            ).fetchone()  # fmt: skip
            if inserted is not None:
                _event(conn, record.id, "created", record.message)
                conn.execute(_NOTIFY, (CHANNEL, record.id))
                return record
        twin = self.by_request_id(record.request_id)
        if twin is None:  # cannot happen: rows are never deleted
            raise StoreUnavailableError(f"request_id {record.request_id!r} vanished; retry")
        return twin

    def save(self, record: JobRecord, durable: bool = True) -> None:
        """Replace a job's record (lease columns untouched); ``durable`` is ignored:
        there is no memory to write to, every save is a database write."""
        with self._tx() as conn:
            _write(conn, record, "id = %s", (record.id,))

    def get(self, job_id: str) -> JobRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return _record(row) if row else None

    def by_request_id(self, request_id: str) -> JobRecord | None:
        if not request_id:
            return None
        with self._tx(write=False) as conn:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE request_id = %s", (request_id,)
            ).fetchone()
        return _record(row) if row else None

    def page(
        self,
        state: JobState | None,
        after: tuple[int, str] | None,
        limit: int,
        tenant: str | None = None,
    ) -> tuple[list[JobRecord], tuple[int, str] | None]:
        """Jobs newest first by ``(create time in ns, id)`` strictly after ``after``
        (a keyset, as SqliteJobStore.page), and the last one's key when more follow."""
        where: list[str] = ["true"]
        params: list[Any] = []
        if state is not None:
            where.append("state = %s")
            params.append(_NUM[state])
        if tenant is not None:
            where.append("tenant = %s")
            params.append(tenant)
        if after is not None:
            where.append("(create_ns, id) < (%s, %s)")
            params += [after[0], after[1]]
        with self._tx(write=False) as conn:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE {' AND '.join(where)} "
                "ORDER BY create_ns DESC, id DESC LIMIT %s",
                (*params, limit + 1),
            ).fetchall()
        records = [_record(row) for row in rows[:limit]]
        more = len(rows) > limit
        return records, ((records[-1].create_ns, records[-1].id) if more else None)

    def all(self) -> list[JobRecord]:
        """Every job, oldest first."""
        with self._tx(write=False) as conn:
            rows = conn.execute(f"SELECT {COLUMNS} FROM jobs ORDER BY create_ns, id").fetchall()
        return [_record(row) for row in rows]

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        self._pool.close()

    # -- watching ------------------------------------------------------------
    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(job_id)`` from a background thread after each job write
        (any process's), and ``callback(None)`` at least every ``poll_s``; returns
        the function that unsubscribes (see server/jobstore/listen.py)."""
        if self._listener is None:
            self._listener = Listener(self.url, self._poll_s)
        return self._listener.subscribe(callback)

    # -- QueueStore ----------------------------------------------------------
    def claim(self, worker: str, lease_s: float, max_attempts: int) -> Claim | None:
        """The oldest claimable job, now RUNNING on ``worker`` under a new token.

        Claimable: QUEUED, or RUNNING with its lease expired (its worker died
        or stalled). A reclaimed job that already ran ``max_attempts`` times
        fails (ABORTED), one whose cancel was requested is CANCELLED: both are
        handed over with that end (Claim.ending), which the claimer writes once
        it settled the job's publication and removed its checkpoints. None when
        nothing is claimable.
        """
        with self._tx() as conn:
            row = conn.execute(
                _CLAIMABLE, (_NUM[JobState.QUEUED], _NUM[JobState.RUNNING])
            ).fetchone()
            if row is None:
                return None
            record, stale_worker = _record(row[:8]), row[3]
            running = _STATE[row[8]] is JobState.RUNNING
            ending = None
            if row[9] or (running and record.attempts >= max_attempts):  # QUEUED: handed back
                ending = given_up(record, stale_worker, row[9])  # the claimer ends it
            return _take(conn, record, worker, lease_s, row[10] or "", ending)

    def renew(self, job_id: str, token: int, lease_s: float) -> Lease:
        """Extend a held lease by ``lease_s`` from now; ``held=False`` once lost."""
        with self._tx() as conn:
            row = conn.execute(
                "UPDATE jobs SET lease_expires = now() + make_interval(secs => %s) "
                "WHERE id = %s AND lease_token = %s AND state = %s "
                "RETURNING cancel_requested, extract(epoch FROM lease_expires)::float8",
                (lease_s, job_id, token, _NUM[JobState.RUNNING]),
            ).fetchone()
        if row is None:
            return Lease(held=False, cancel_requested=False, expires=0.0)
        return Lease(held=True, cancel_requested=bool(row[0]), expires=float(row[1]))

    def save_leased(self, record: JobRecord, token: int) -> bool:
        """Write the record of a job this worker still holds (token current, RUNNING);
        False, writing nothing, once the lease was lost. A hand-back (QUEUED) of a job
        whose cancel is pending ends it CANCELLED instead: a cancel survives hand-backs."""
        with self._tx() as conn:
            if record.state is JobState.QUEUED:
                row = conn.execute(
                    "SELECT cancel_requested, worker FROM jobs WHERE id = %s AND lease_token = %s"
                    " AND state = %s FOR UPDATE",
                    (record.id, token, _NUM[JobState.RUNNING]),
                ).fetchone()
                if row is None:
                    return False
                if row[0]:
                    record = given_up(record, row[1] or "", cancel_requested=True)
            return _write(
                conn,
                record,
                "id = %s AND lease_token = %s AND state = %s",
                (record.id, token, _NUM[JobState.RUNNING]),
            )

    def fence(self, job_id: str, token: int, min_remaining_s: float, publish_uri: str = "") -> bool:
        """May the holder of ``token`` publish (to ``publish_uri``) now?

        True iff the lease of ``token`` is still current, the job RUNNING, no
        cancel requested, and the lease has more than ``min_remaining_s`` left;
        the lease is then extended to at least twice that from now, so no other
        worker can reclaim the job while it publishes, and ``publish_uri`` (when
        given) recorded in the same statement: a later attempt looks there first.
        The worker asks for its job subprocess, which never reaches the store
        itself (workers/spawn.py).
        """
        with self._tx() as conn:
            return _fence(conn, job_id, token, min_remaining_s, publish_uri)

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a job: QUEUED ends CANCELLED at once; RUNNING gets its cancel flag
        (its worker sees it at the next renewal and ends it), and so does a QUEUED
        job whose fence recorded a version (the next claim hands it over to end it,
        that version settled: Claim.ending); an ended job is left as it is. The job
        as it is now; None when there is no such job."""
        with self._tx() as conn:
            row = conn.execute(
                f"SELECT {COLUMNS}, publish_uri FROM jobs WHERE id = %s FOR UPDATE", (job_id,)
            ).fetchone()
            if row is None:
                return None
            record = _record(row[:8])
            if record.state is JobState.QUEUED and not row[8]:
                error = JobError(grpc.StatusCode.CANCELLED, "cancelled while queued")
                record = record.evolve(
                    state=JobState.CANCELLED, end_ns=now_ns(), error=error, message=error.message
                )
                _write(conn, record, "id = %s", (job_id,))
            elif record.state in (JobState.QUEUED, JobState.RUNNING):
                conn.execute(
                    "UPDATE jobs SET cancel_requested = true, version = version + 1 WHERE id = %s",
                    (job_id,),
                )
                _event(conn, job_id, "cancel_requested", "")
                conn.execute(_NOTIFY, (CHANNEL, job_id))
            return record

    def secret(self, name: str) -> bytes:
        """A secret every process on this database shares (page tokens' key)."""
        with self._tx() as conn:
            return shared_secret(conn, name)

    def live_leases(self, job_ids: list[str]) -> dict[str, int]:
        """The fencing token of each of ``job_ids`` that is RUNNING under an unexpired lease."""
        with self._tx(write=False) as conn:
            rows = conn.execute(
                "SELECT id, lease_token FROM jobs WHERE id = ANY(%s) AND state = %s "
                "AND lease_expires > now()",
                (list(job_ids), _NUM[JobState.RUNNING]),
            ).fetchall()
        return {job_id: int(token) for job_id, token in rows}

    def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, 0 for none)."""
        with self._tx(write=False) as conn:
            rows = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(JobState, 0)
        for number, count in rows:
            counts[_STATE.get(number, JobState.UNSPECIFIED)] += int(count)
        return counts


def _fence(conn: Any, job_id: str, token: int, min_remaining_s: float, uri: str) -> bool:
    row = conn.execute(
        "UPDATE jobs SET lease_expires = greatest(lease_expires, "
        "now() + make_interval(secs => %s)), "
        "publish_uri = CASE WHEN %s = '' THEN publish_uri ELSE %s END "
        "WHERE id = %s AND lease_token = %s AND state = %s "
        "AND NOT cancel_requested AND lease_expires > now() + make_interval(secs => %s) "
        "RETURNING id",
        (2 * min_remaining_s, uri, uri, job_id, token, _NUM[JobState.RUNNING], min_remaining_s),
    ).fetchone()
    return row is not None


def _take(
    conn: Any,
    record: JobRecord,
    worker: str,
    lease_s: float,
    publish_uri: str,
    ending: JobRecord | None = None,
) -> Claim:
    """Mark a locked row RUNNING on ``worker`` under the next token (a pending cancel
    is kept when the claim is only to end the job: ``ending``)."""
    running = taken(record, worker)
    state, data, report = encode_row(running)
    row = conn.execute(
        "UPDATE jobs SET state = %s, data = %s, report = %s, attempts = %s, worker = %s, "
        "lease_expires = now() + make_interval(secs => %s), lease_token = lease_token + 1, "
        "cancel_requested = cancel_requested AND %s, update_time = now(), "
        "version = version + 1 WHERE id = %s "
        "RETURNING lease_token, extract(epoch FROM lease_expires)::float8",
        (state, data, report, running.attempts, worker, lease_s, ending is not None, record.id),
    ).fetchone()
    _event(conn, record.id, "claimed", f"attempt {running.attempts} on {worker}")
    conn.execute(_NOTIFY, (CHANNEL, record.id))
    claimed = _with_lease(running, worker, float(row[1]))
    return Claim(record=claimed, token=int(row[0]), publish_uri=publish_uri, ending=ending)


def _write(conn: Any, record: JobRecord, where: str, params: tuple[Any, ...]) -> bool:
    """Update the row of ``record`` where ``where`` holds, then event and NOTIFY."""
    state, data, report = encode_row(record)
    done = record.state.terminal or record.state is JobState.QUEUED
    cursor = conn.execute(
        f"UPDATE jobs SET {_WRITE} WHERE {where}",
        (state, data, report, record.attempts, done, *params),
    )
    if cursor.rowcount == 0:
        return False
    if done:
        _event(conn, record.id, record.state.value.lower(), record.message)
    conn.execute(_NOTIFY, (CHANNEL, record.id))
    return True


def _event(conn: Any, job_id: str, kind: str, message: str) -> None:
    conn.execute(
        "INSERT INTO job_events (job_id, kind, message) VALUES (%s, %s, %s)",
        (job_id, kind, message),
    )


def _record(row: Any) -> JobRecord:
    """A record from COLUMNS; an undecodable row reads as FAILED (DATA_LOSS)."""
    job_id, data, report, worker, expires, request_id, create_ns, _ = row
    record = decode_row(job_id, bytes(data) if data is not None else None, report)
    if record is None:
        log.error("job %s: its row does not decode as a secateur.v1.Job", job_id)
        record = quarantined(job_id, request_id, create_ns)
    return _with_lease(record, worker or "", expires)


def _with_lease(record: JobRecord, worker: str, expires: float | None) -> JobRecord:
    """The record with the worker and lease expiry the row's columns hold."""
    return replace(record, worker=worker, lease_expires=expires or 0.0)


def _safe(url: str) -> str:
    """``url`` without its password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - only for messages
        return "(an unparsable URL)"
    return (
        f"{parts.get('host', '')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"
        f" as {parts.get('user', '')}"
    )


__all__ = ["DuplicateRequestError", "PostgresJobStore", "StoreUnavailableError"]
