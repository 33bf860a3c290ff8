"""The PostgreSQL job store's schema: versioned migrations applied on open.

Each migration is a list of statements with a version number; the versions
applied are rows of ``schema_migrations``. :func:`migrate` runs in ONE
transaction holding ``pg_advisory_xact_lock(MIGRATION_LOCK)``, so any number
of replicas and workers opening an empty database at the same moment queue
on the lock: the first creates the schema, the others find it there and
apply nothing. A migration is never edited once released; a change is a new
version appended to :data:`MIGRATIONS`.
"""

from __future__ import annotations

import os
from typing import Any

#: The advisory lock key of migrations (any constant shared by every process).
MIGRATION_LOCK = 0x5EC47E0A
#: The channel every job write notifies, with the job id as payload.
CHANNEL = "secateur_jobs"

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            # create_ns keeps the record's exact create time for ListJobs keys
            # (timestamptz has microseconds only); data is the secateur.v1.Job
            # as SqliteJobStore stores it, report the result's JSON beside it.
            """CREATE TABLE jobs (
                id text PRIMARY KEY,
                request_id text UNIQUE,
                state smallint NOT NULL,
                create_ns bigint NOT NULL,
                create_time timestamptz NOT NULL,
                update_time timestamptz NOT NULL DEFAULT now(),
                data bytea NOT NULL,
                report text,
                worker text NOT NULL DEFAULT '',
                lease_expires timestamptz,
                lease_token bigint NOT NULL DEFAULT 0,
                attempts integer NOT NULL DEFAULT 0,
                cancel_requested boolean NOT NULL DEFAULT false,
                version bigint NOT NULL DEFAULT 1
            )""",
            "CREATE INDEX jobs_by_state_time ON jobs (state, create_ns)",
            "CREATE INDEX jobs_by_create ON jobs (create_ns DESC, id DESC)",
            """CREATE TABLE job_events (
                seq bigserial PRIMARY KEY,
                job_id text NOT NULL,
                time timestamptz NOT NULL DEFAULT now(),
                kind text NOT NULL,
                message text NOT NULL DEFAULT ''
            )""",
            "CREATE INDEX job_events_by_job ON job_events (job_id, seq)",
        ],
    ),
    (
        2,
        [
            # Secrets every replica shares, as ListJobs page tokens' signing key:
            # a token one replica issues is accepted by the others.
            "CREATE TABLE shared_secrets (name text PRIMARY KEY, value bytea NOT NULL)",
        ],
    ),
    (
        3,
        [
            # Issue 18, item 8: a job belongs to the tenant whose token created it
            # (also inside `data`, the Job's `tenant`); ListJobs pages one tenant's jobs.
            "ALTER TABLE jobs ADD COLUMN tenant text NOT NULL DEFAULT ''",
            "CREATE INDEX jobs_by_tenant_create ON jobs (tenant, create_ns DESC, id DESC)",
        ],
    ),
    (
        4,
        [
            # Issue 18, item 1: the version a job's fence let it publish (written with
            # the fence), so a later attempt finds its own version instead of publishing again.
            "ALTER TABLE jobs ADD COLUMN publish_uri text NOT NULL DEFAULT ''",
        ],
    ),
]


def migrate(conn: Any) -> list[int]:
    """Bring the database to the newest schema; the versions this call applied.

    ``conn`` is a psycopg connection outside a transaction; everything
    happens in one transaction under the advisory lock (see module docstring).
    """
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, statements in MIGRATIONS:
            if version in done:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            applied.append(version)
    return applied


def shared_secret(conn: Any, name: str) -> bytes:
    """The secret called ``name`` (32 random bytes made by the first process to ask)."""
    conn.execute(
        "INSERT INTO shared_secrets (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
        (name, os.urandom(32)),
    )
    row = conn.execute("SELECT value FROM shared_secrets WHERE name = %s", (name,)).fetchone()
    return bytes(row[0])


def newest_version() -> int:
    return max(version for version, _ in MIGRATIONS)
