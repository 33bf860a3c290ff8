"""The job store: durable jobs, their queue and leases, and :func:`open_store`.

- ``interface``: the :class:`JobStore`/:class:`QueueStore` protocols every store meets.
- ``records``: a job as plain data; ``jobs_pb``: records <-> ``secateur.v1.Job``;
  ``codec``: records <-> stored rows; ``page_tokens``: ListJobs cursors.
- ``sqlite``: the embedded store (the default, one file under the state directory).
- ``postgres``, ``schema``, ``listen``, ``cache``: the shared PostgreSQL store,
  its migrations, its change notifications and a serving replica's record cache.
- ``writes``: store writes that survive a store refusing them for a while.
"""

from __future__ import annotations

import os

from secateur.server.jobstore.cache import CachingPostgresJobStore
from secateur.server.jobstore.interface import JobStore, QueueStore, StoreOpenError
from secateur.server.jobstore.postgres import PostgresJobStore
from secateur.server.jobstore.sqlite import SqliteJobStore

__all__ = ["JobStore", "QueueStore", "StoreOpenError", "open_store"]


def open_store(url: str, state_dir: str, cache: bool = True) -> QueueStore:
    """The store a ``--store`` URL names.

    ``""`` or ``sqlite:///<state_dir>/jobs.sqlite`` is the embedded default
    (:class:`SqliteJobStore`); ``sqlite:///ABS/DIR/jobs.sqlite`` keeps it in
    another folder; ``postgresql://USER[:PASS]@HOST:PORT/DB`` (or
    ``postgres://``) is the shared :class:`~secateur.server.jobstore.postgres.PostgresJobStore`,
    with a serving replica's record cache unless ``cache`` is False (workers:
    see server/jobstore/cache.py).

    Raises:
        StoreOpenError: an unknown scheme, a SQLite path that is not an absolute
            ``.../jobs.sqlite``, or a database that cannot be opened.
    """
    if not url:
        return SqliteJobStore(state_dir)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        path = url[len("sqlite://") :]
        if not path.startswith("/") or os.path.basename(path) != "jobs.sqlite":
            raise StoreOpenError(
                "a SQLite store URL must name an absolute path to a file called jobs.sqlite, "
                f"as sqlite:///var/lib/secateur/jobs.sqlite. Received: {url}"
            )
        return SqliteJobStore(os.path.dirname(path))
    if scheme in ("postgresql", "postgres"):
        return CachingPostgresJobStore(url) if cache else PostgresJobStore(url)
    raise StoreOpenError(
        "the store URL must start with sqlite:/// or postgresql:// "
        "(postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE). "
        f"Received: {_without_password(url)}"
    )


def _without_password(url: str) -> str:
    """``url`` with any password replaced by ``***`` (it is echoed in errors)."""
    head, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{head}://{creds.split(':', 1)[0]}:***@{host}"
