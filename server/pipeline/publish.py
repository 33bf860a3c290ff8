"""A job's version, published exactly once: the publication marker and its recognition.

Every version a service job publishes carries ``assets.extra/secateur/publication.json``
(:data:`~secateur.server.storage.backend.PUBLICATION_MARKER`): the job's id and the
MD5 of every other file of the version. Before it publishes, the job asks its
worker's fence for the version's URI, and the store records that URI with the
fence (in the same write that grants it). A later attempt of the same job (its
worker was stopped after the publish, the store was away when the job ended,
its worker stalled past its lease) is handed that URI and calls
:func:`own_version` first:

- the version there is this job's (marker names it) and complete (every file's
  MD5 as the marker lists it): the job ends SUCCEEDED from the report in it,
  nothing is run or published again;
- it is this job's but incomplete (a ``gs://`` publish killed between its first
  and its last copy; ``saved_model.pb`` is copied last, so readers never took it
  for a version): it is deleted, and the job runs again (a complete version
  changed since is left alone);
- anything else (nothing there, another job's version): the job runs again and
  never touches it.

A job that ends without a next attempt is settled the same way by its worker
(:func:`settle`, called from ``workers/lifecycle.settled``), which also removes
the staging (``<base>/.tmp-<job>-<uuid>``) its killed publishes left.

The job stops at the test hook :func:`~secateur.server.holds.hold` at
``exporting``, ``fenced`` and ``published`` (server/holds.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from secateur.pruner.errors import CancelledError
from secateur.server.holds import hold
from secateur.server.storage import Storage, StorageExistsError, StorageNotFoundError
from secateur.server.storage.backend import PUBLICATION_MARKER, SAVED_MODEL_FILE

__all__ = ["LeaseLost", "Settled", "own_version", "publish_version", "settle", "write_marker"]

#: The report a version carries beside its marker.
REPORT = "assets.extra/secateur/report.json"
#: How often an automatic version number is taken again when another job was quicker.
VERSION_TRIES = 5


class LeaseLost(Exception):
    """The job's fence refused publication: another worker owns the job now."""


def file_sums(root: str) -> dict[str, str]:
    """``{relative path: MD5 hex}`` of every file under ``root`` but the marker."""
    sums: dict[str, str] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if rel != PUBLICATION_MARKER:
                with open(path, "rb") as fh:
                    sums[rel] = hashlib.file_digest(fh, "md5").hexdigest()
    return sums


def write_marker(version_dir: str, job_id: str) -> None:
    """Write the version's publication marker: the job and every other file's MD5."""
    marker = {"job": job_id, "files": file_sums(version_dir)}
    path = os.path.join(version_dir, *PUBLICATION_MARKER.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(marker, fh, sort_keys=True)


@dataclass(frozen=True)
class Settled:
    """What :func:`settle` found at a job's recorded version."""

    #: The version's report: it is the job's and complete (the work was done).
    report: dict[str, Any] | None = None
    #: It was the job's and incomplete, and was deleted.
    removed: bool = False
    #: The job's staging places removed under the version's base.
    staging: tuple[str, ...] = ()


def settle(storage: Storage, uri: str, job_id: str) -> Settled:
    """Settle the publication of a job that ends without success after its fence
    recorded ``uri``: its complete version is reported, its half version removed,
    and the staging its killed publishes left removed too; another job's version,
    or a complete version changed since, is never touched. Storage calls only."""
    removed: list[bool] = []
    report = own_version(storage, uri, job_id, removed)
    base = uri.rsplit("/", 1)[0]
    return Settled(report, bool(removed), tuple(storage.remove_staging(base, job_id)))


def own_version(
    storage: Storage, uri: str, job_id: str, removed: list[bool] | None = None
) -> dict[str, Any] | None:
    """The report of ``uri`` when it is ``job_id``'s complete version; None otherwise,
    after deleting it when it is ``job_id``'s but incomplete (see the module docstring;
    ``removed`` gets a True appended then)."""
    try:
        marker = json.loads(storage.read_bytes(f"{uri}/{PUBLICATION_MARKER}"))
    except (StorageNotFoundError, ValueError):
        return None  # nothing there, or not a marker this service wrote
    if not isinstance(marker, dict) or marker.get("job") != job_id:
        return None  # another job's version: never touched
    present = {k: v for k, v in storage.checksums(uri).items() if k != PUBLICATION_MARKER}
    if present != marker.get("files"):
        if SAVED_MODEL_FILE not in present:  # our half version: no reader took it; rolled back
            storage.delete(uri, missing_ok=True)
            if removed is not None:
                removed.append(True)
        return None  # complete but changed since: left alone, the job runs again
    report: dict[str, Any] = json.loads(storage.read_bytes(f"{uri}/{REPORT}"))
    report["output_uri"] = uri
    report["recovered"] = True
    return report


def publish_version(
    storage: Storage,
    version_dir: str,
    base: Any,
    version: int | None,
    job_id: str = "",
    fence: Callable[[str], bool] | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    published: Callable[[], None] = lambda: None,
) -> str:
    """Publish ``version_dir`` as ``<base>/<version>`` (None: the next free one); its URI.

    The last point a cancel stops the job with nothing published is here; then
    the version's URI is fenced (recorded in the store by the worker) and only
    then published. An automatic version another job took meanwhile is taken
    again, up to :data:`VERSION_TRIES` times. ``published`` is called once the
    version is in place (the job's checkpoints go then: any next attempt ends from
    the version, and the output shows nothing but it from that moment).

    Raises:
        CancelledError: ``should_cancel`` is true before the fence.
        LeaseLost: the fence refused.
        StorageExistsError: ``version`` (given) exists, or no free one was found.
    """
    hold("exporting")
    if should_cancel():  # the last moment a stop can still leave nothing behind
        raise CancelledError("job cancelled before publishing")
    if job_id:
        write_marker(version_dir, job_id)
    for attempt in range(VERSION_TRIES):
        number = version if version is not None else storage.next_version(base)
        uri = storage.locate(base).child(str(number)).uri
        if fence is not None and not fence(uri):
            raise LeaseLost("this worker lost the job's lease before publishing; nothing published")
        hold("fenced")
        try:
            uri_out = storage.publish_dir(version_dir, base, number, owner=job_id)
        except StorageExistsError:
            if version is not None or attempt == VERSION_TRIES - 1:
                raise
            continue
        published()
        hold("published")
        return uri_out
    raise AssertionError("unreachable")
