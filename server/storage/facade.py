"""The :class:`Storage` facade: parse and allow-list once, dispatch by scheme, publish safely."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from secateur.server.storage.backend import Backend, staging_pattern
from secateur.server.storage.errors import (
    ByteBudget,
    InvalidUriError,
    StorageError,
    StorageExistsError,
    StorageNotFoundError,
    StoragePermissionError,
)
from secateur.server.storage.gcs import GcsBackend
from secateur.server.storage.local import LocalBackend
from secateur.server.storage.location import AllowList, Location
from secateur.server.storage.tfrecord import iter_records

__all__ = ["Storage", "UriLike"]

#: What every public method takes: a URI as the user wrote it, or a parsed Location.
UriLike = str | Location


class Storage:
    """Read, list, write and publish by URI (local path, ``file://``, ``gs://``).

    Every public method accepts a URI string or a :class:`Location`; strings are
    parsed once, here, and every location is checked against the allow-list
    before a backend sees it.

    Args:
        allowed_prefixes: URIs every operation must stay within; ``None`` allows
            everything. Prefixes are normalised once, here.
        gcs_client: a ``google.cloud.storage.Client`` (or compatible) to use;
            created lazily on the first ``gs://`` call otherwise.
        gcs_timeout: seconds for the GCS connect timeout and for the retry
            deadline, so an unreachable host fails within a few seconds.
    """

    def __init__(
        self,
        allowed_prefixes: Sequence[str] | None = None,
        gcs_client: Any | None = None,
        *,
        gcs_timeout: float = 5.0,
        max_download_bytes: int | None = None,
    ) -> None:
        self._allow = AllowList(allowed_prefixes)
        #: ``download`` stops (DownloadTooLargeError, no partial copy) past this many bytes.
        self.max_download_bytes = max_download_bytes
        self._backends: dict[str, Backend] = {
            "file": LocalBackend(self._allow),
            "gs": GcsBackend(gcs_client, gcs_timeout),
        }

    @property
    def allowed_prefixes(self) -> tuple[str, ...] | None:
        """The normalised allow-list, or ``None`` when everything is allowed."""
        return self._allow.prefixes

    def locate(self, uri: UriLike, field: str = "") -> Location:
        """Parse ``uri`` and check it against the allow-list.

        Args:
            uri: what the user sent (or a Location, checked again here).
            field: the request field ``uri`` came from; errors carry it as
                ``.field`` so the service names it in a BadRequest violation.

        Raises:
            InvalidUriError: malformed URI or unsupported scheme.
            StoragePermissionError: outside the allow-list.
        """
        try:
            return self._allow.check(Location.parse(uri))
        except StorageError as exc:
            exc.field = exc.field or field
            raise

    def _at(self, uri: UriLike) -> tuple[Location, Backend]:
        loc = self.locate(uri)
        return loc, self._backends[loc.scheme]

    # -- places ------------------------------------------------------------

    def normalize(self, uri: UriLike) -> str:
        """The normalised form of ``uri`` (real absolute path, or ``gs://bucket/key``)."""
        return self.locate(uri).uri

    def within(self, uri: UriLike, container: UriLike) -> bool:
        """True when ``uri`` is ``container`` or lies under it, both normalised.

        ``file://``, trailing slashes, ``..`` and symlinks (locally) are
        resolved first, so two spellings of one place compare equal; a local
        path never lies within a ``gs://`` URI or the other way round.
        """
        return self.locate(uri).within(self.locate(container))

    def is_allowed(self, uri: UriLike) -> bool:
        """True when ``uri`` is valid and lies within the allow-list."""
        try:
            self.locate(uri)
        except StoragePermissionError:
            return False
        return True

    # -- reading -----------------------------------------------------------

    def exists(self, uri: UriLike) -> bool:
        """True when a file or a directory (on GCS: any blob under ``uri/``) exists."""
        loc, backend = self._at(uri)
        return backend.exists(loc)

    def find(self, pattern: UriLike) -> list[Location]:
        """The matches of ``pattern`` as Locations, sorted; see :meth:`glob`."""
        loc, backend = self._at(pattern)
        matches = [m for m in backend.glob(loc) if self._allow.permits(m)]
        if not matches:
            raise StorageNotFoundError(
                "No file, directory, object or prefix matches the pattern.", loc.text
            )
        return matches

    def glob(self, pattern: UriLike) -> list[str]:
        """Sorted URIs matching ``pattern`` (``*``, ``?``, ``[...]`` within one path segment).

        The pattern itself must lie within the allow-list; local matches whose
        real path escapes it are left out. Hidden entries (names starting with
        ``.``) match only a pattern segment that starts with ``.`` too. Local
        matches come back as absolute paths (``file://`` URIs for a ``file://``
        pattern), GCS matches as ``gs://bucket/key``. Raises
        :class:`StorageNotFoundError` when nothing matches.
        """
        return [m.text for m in self.find(pattern)]

    def read_bytes(self, uri: UriLike) -> bytes:
        """The whole content of one file or object."""
        loc, backend = self._at(uri)
        return backend.read_bytes(loc)

    def read_records(self, uri: UriLike) -> Iterator[bytes]:
        """The records of one TFRecord file, streamed where it lies (never copied).

        A ``gs://`` object is read in ranged chunks; every record's checksums
        are checked (see :mod:`~secateur.server.storage.tfrecord`).

        Raises:
            RecordFramingError: a truncated or corrupt record (a ``ValueError``).
            StorageError subclasses: the file cannot be read.
        """
        loc, backend = self._at(uri)
        with backend.open_read(loc) as stream:
            yield from iter_records(stream)

    def download(self, uri: UriLike, local_dir: str) -> str:
        """Copy a file or a directory tree into ``local_dir``; return the local copy's path.

        The copy keeps the basename of ``uri`` and replaces a same-named entry
        already in ``local_dir``. A tree is assembled in a temporary sibling
        first, so a failure leaves no partial copy behind.
        """
        loc, backend = self._at(uri)
        os.makedirs(local_dir, exist_ok=True)
        target = os.path.join(local_dir, loc.name)
        cap = self.max_download_bytes
        backend.download(loc, target, None if cap is None else ByteBudget(cap, loc.text))
        return target

    def checksums(self, uri: UriLike) -> dict[str, str]:
        """``{relative path: MD5 hex}`` of every file under the directory ``uri``."""
        loc, backend = self._at(uri)
        return backend.checksums(loc)

    def list_versions(self, base_uri: UriLike) -> list[int]:
        """Sorted integer-named children of ``base_uri`` (``<base>/<version>/``); [] if none."""
        loc, backend = self._at(base_uri)
        return backend.list_versions(loc)

    def next_version(self, base_uri: UriLike) -> int:
        """The highest existing version plus one, or 1."""
        versions = self.list_versions(base_uri)
        return versions[-1] + 1 if versions else 1

    # -- writing -----------------------------------------------------------

    def write_bytes(self, uri: UriLike, data: bytes) -> None:
        """Write ``data`` to one file or object, replacing it (atomically for local files)."""
        loc, backend = self._at(uri)
        backend.write_bytes(loc, data)

    def delete(self, uri: UriLike, *, missing_ok: bool = False) -> None:
        """Delete a file or a whole tree (on GCS: the object and every blob under ``uri/``)."""
        loc, backend = self._at(uri)
        backend.delete(loc, missing_ok=missing_ok)

    def publish_dir(
        self, local_dir: str, base_uri: UriLike, version: int | None = None, *, owner: str = ""
    ) -> str:
        """Publish the tree ``local_dir`` as ``<base_uri>/<version>/`` and return that URI.

        ``version=None`` takes :meth:`next_version`. An existing version raises
        :class:`StorageExistsError` and nothing is written. Readers never see a
        half-written version: the tree is staged under ``<base>/.tmp-<uuid>``
        (``.tmp-<owner>-<uuid>`` given an ``owner``, see :meth:`remove_staging`),
        the version is checked free again, and only then made visible (one
        rename locally; on GCS a copy with ``saved_model.pb`` last). Any failure
        removes what this publish wrote (a killed process's staging stays: see
        :meth:`remove_staging`).
        """
        base, backend = self._at(base_uri)
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 0
        ):
            raise InvalidUriError(
                f"A version must be a non-negative integer, not {version!r}.", base.text
            )
        if not os.path.isdir(local_dir):
            raise StorageNotFoundError("The directory to publish does not exist.", local_dir)
        final = base.child(str(self.next_version(base) if version is None else version))
        self._check_free(backend, base, final)
        staging = backend.begin(base, owner)
        try:
            backend.stage(local_dir, staging)
            self._check_free(backend, base, final)  # another writer may have been quicker
            backend.commit(staging, final)
        except BaseException:
            backend.rollback(staging)
            raise
        backend.cleanup(staging)
        return final.uri

    def remove_staging(self, base_uri: UriLike, owner: str) -> list[str]:
        """Delete what publishes by ``owner`` (a job's id) staged under ``base_uri`` and left
        there (their process was killed); the URIs removed. Nothing else is touched."""
        if not owner:
            raise InvalidUriError("Removing staging needs its owner.", str(base_uri))
        base = self.locate(base_uri)
        try:
            found = self.find(base.child(staging_pattern(owner)))
        except StorageNotFoundError:
            return []
        for loc in found:
            self._backends[loc.scheme].delete(loc, missing_ok=True)
        return [loc.uri for loc in found]

    @staticmethod
    def _check_free(backend: Backend, base: Location, final: Location) -> None:
        if int(final.name) in backend.list_versions(base) or backend.exists(final):
            raise StorageExistsError(
                f"Version {final.name} already exists under '{base.uri}'; versions are never "
                "overwritten.",
                final.uri,
            )
