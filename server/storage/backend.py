"""The interface every storage backend implements, and the publish hand-over.

A backend moves bytes for one scheme. It receives :class:`Location` objects
the facade (:class:`~secateur.server.storage.Storage`) has already parsed and
checked against the allow-list, and raises only the typed
:mod:`~secateur.server.storage.errors`, naming ``loc.text``.

Publishing is split into primitives so the rule itself -- assemble privately,
check the version is still free, make it visible last, never overwrite, undo
everything on failure -- lives once, in the facade::

    staging = backend.begin(base)
    try:
        backend.stage(local_dir, staging)    # private copy, invisible to readers
        <check the version is still free>
        backend.commit(staging, final)       # visible; never overwrites
    except BaseException:
        backend.rollback(staging)            # nothing of this publish remains
        raise
    backend.cleanup(staging)                 # drop the private copy
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from secateur.server.storage.errors import ByteBudget
from secateur.server.storage.location import Location

__all__ = [
    "PUBLICATION_MARKER",
    "SAVED_MODEL_FILE",
    "TMP_PREFIX",
    "Backend",
    "Staging",
    "ordered_for_publish",
    "staging_pattern",
]

#: Name of the file TF Serving waits for; made visible last where that matters.
SAVED_MODEL_FILE = "saved_model.pb"
#: A service job's mark on its version (server/pipeline/publish.py): made visible first,
#: so a half version a killed publish leaves is known as that job's.
PUBLICATION_MARKER = "assets.extra/secateur/publication.json"
#: Prefix of the temporary siblings used while publishing or downloading.
TMP_PREFIX = ".tmp-"
VERSION_RE = re.compile(r"^[0-9]+$")


@dataclass
class Staging:
    """One publish in progress: where its private copy is and what it wrote.

    Attributes:
        base: the ``<base>`` of ``<base>/<version>/``.
        tmp: the private sibling (``<base>/.tmp-<uuid>``) the tree is staged in.
        written: what this publish created so far (backend-specific names),
            so a rollback removes exactly that and nothing of another writer.
        committed: what :meth:`Backend.commit` made visible so far.
        created_base: the publish created ``base`` itself (removed on rollback
            if still empty).
        files: the staged files' relative paths, in publish order.
    """

    base: Location
    tmp: Location
    files: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)
    created_base: bool = False


def new_staging(base: Location, owner: str = "") -> Staging:
    """A staging place under ``base``: ``.tmp-<uuid>``, or ``.tmp-<owner>-<uuid>`` so that
    what a killed publish of ``owner`` (a job's id) left can be found and removed."""
    tag = f"{owner}-" if owner else ""
    return Staging(base, base.child(f"{TMP_PREFIX}{tag}{uuid.uuid4().hex}"))


def staging_pattern(owner: str) -> str:
    """The glob segment matching the staging places of ``owner`` (see :func:`new_staging`)."""
    return f"{TMP_PREFIX}{owner}-*"


def ordered_for_publish(rel_paths: Sequence[str]) -> list[str]:
    """Sorted relative paths, the publication marker first and every ``saved_model.pb`` last.

    TF Serving treats a version as ready once its ``saved_model.pb`` exists, so
    a backend that cannot rename a tree atomically writes that file last (the
    commit point); the marker first says whose any half-copied version is.
    """
    ordered = sorted(rel_paths)
    first = [p for p in ordered if p == PUBLICATION_MARKER]
    last = [p for p in ordered if p.rsplit("/", 1)[-1] == SAVED_MODEL_FILE]
    return first + [p for p in ordered if p not in last and p not in first] + last


class Backend(Protocol):
    """Byte moving for one URI scheme (see the module docstring for publishing)."""

    def exists(self, loc: Location) -> bool:
        """A file or a directory (on GCS: an object, or any blob under ``key/``)."""
        ...

    def glob(self, pattern: Location) -> list[Location]:
        """Matches of ``*``, ``?``, ``[...]`` within one segment; hidden names only
        for a segment starting with ``.``; [] when none."""
        ...

    def read_bytes(self, loc: Location) -> bytes: ...

    def open_read(self, loc: Location) -> AbstractContextManager[BinaryIO]:
        """One file or object as a binary stream, read in chunks (no local copy)."""
        ...

    def write_bytes(self, loc: Location, data: bytes) -> None: ...

    def download(self, loc: Location, target: str, budget: ByteBudget | None = None) -> None:
        """Copy a file or tree to the local path ``target``, replacing it, never
        leaving a partial copy; its bytes counted against ``budget`` while streaming."""
        ...

    def list_versions(self, base: Location) -> list[int]:
        """Sorted integer-named children of ``base``; [] when ``base`` is missing."""
        ...

    def delete(self, loc: Location, *, missing_ok: bool) -> None: ...

    def checksums(self, loc: Location) -> dict[str, str]:
        """``{path relative to loc: MD5 hex}`` of every file under the directory ``loc``."""
        ...

    def begin(self, base: Location, owner: str = "") -> Staging: ...

    def stage(self, local_dir: str, staging: Staging) -> None: ...

    def commit(self, staging: Staging, final: Location) -> None: ...

    def rollback(self, staging: Staging) -> None: ...

    def cleanup(self, staging: Staging) -> None: ...
