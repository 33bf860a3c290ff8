"""The local-filesystem backend (plain paths and ``file://`` URIs).

A version is published by copying the tree into ``<base>/.tmp-<uuid>`` and
then one ``os.rename`` to ``<base>/<version>``: readers see all of it or none.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from typing import BinaryIO

from secateur.server.storage import localfs
from secateur.server.storage.backend import VERSION_RE, Staging, new_staging
from secateur.server.storage.errors import (
    ByteBudget,
    InvalidUriError,
    StorageError,
    StorageExistsError,
    StorageNotFoundError,
    StoragePermissionError,
    copy_counted,
)
from secateur.server.storage.location import AllowList, Location, is_under

__all__ = ["LocalBackend"]


def _copy_file(src: str, dst: str, budget: ByteBudget | None = None) -> None:
    """Copy one file (content and metadata), counted against ``budget``; a seam for tests."""
    if budget is None:
        shutil.copy2(src, dst)
        return
    with open(src, "rb") as reader, open(dst, "wb") as writer:
        copy_counted(reader.read, writer.write, budget)
    shutil.copystat(src, dst)


class LocalBackend:
    """:class:`~secateur.server.storage.backend.Backend` for local paths.

    Args:
        allow: the allow-list; a tree being copied may hold symlinks, and each
            file reached through one is checked against it.
    """

    def __init__(self, allow: AllowList) -> None:
        self._allow = allow

    def exists(self, loc: Location) -> bool:
        return os.path.exists(loc.path)

    def glob(self, pattern: Location) -> list[Location]:
        # Match the user's spelling so matches come back in it (file:// stays file://).
        matches = sorted(m for m in globlib.glob(pattern.given_path) if os.path.exists(m))
        as_uri = pattern.given_as_file_uri
        return [
            Location("file", os.path.realpath(m), text=f"file://{m}" if as_uri else m)
            for m in matches
        ]

    def read_bytes(self, loc: Location) -> bytes:
        if os.path.isdir(loc.path):
            raise StorageNotFoundError("Expected a file but found a directory.", loc.text)
        with localfs.os_errors(loc.text), open(loc.path, "rb") as handle:
            return handle.read()

    @contextlib.contextmanager
    def open_read(self, loc: Location) -> Iterator[BinaryIO]:
        if os.path.isdir(loc.path):
            raise StorageNotFoundError("Expected a file but found a directory.", loc.text)
        with localfs.os_errors(loc.text), open(loc.path, "rb") as handle:
            yield handle

    def write_bytes(self, loc: Location, data: bytes) -> None:
        with localfs.os_errors(loc.text):
            os.makedirs(os.path.dirname(loc.path), exist_ok=True)
            localfs.replace_file(loc.path, lambda tmp: localfs.write_file(tmp, data))

    def download(self, loc: Location, target: str, budget: ByteBudget | None = None) -> None:
        if not os.path.exists(loc.path):
            raise StorageNotFoundError("Nothing exists at this path.", loc.text)
        if os.path.realpath(target) == loc.path:
            return  # already there
        local_dir = os.path.dirname(target)
        if not os.path.isdir(loc.path):
            with localfs.os_errors(loc.text):
                localfs.replace_file(target, lambda tmp: _copy_file(loc.path, tmp, budget))
            return
        if is_under(os.path.realpath(local_dir), loc.path):
            raise StorageError(
                f"Cannot download a directory into itself ('{local_dir}').", loc.text
            )
        localfs.fill_tree(target, loc.text, lambda tmp: self._copy_tree(loc, tmp, budget))

    def _copy_tree(self, loc: Location, dst: str, budget: ByteBudget | None = None) -> None:
        """Copy ``loc`` into the existing ``dst``, refusing files outside the allow-list."""

        def copy_one(source: str, dest: str) -> None:
            if not self._allow.permits_path(source):
                raise StoragePermissionError(
                    f"'{source}' resolves outside the allowed prefixes "
                    f"(to '{os.path.realpath(source)}').",
                    loc.text,
                )
            _copy_file(source, dest, budget)

        shutil.copytree(loc.path, dst, copy_function=copy_one, dirs_exist_ok=True)

    def list_versions(self, base: Location) -> list[int]:
        if not os.path.isdir(base.path):
            return []
        with localfs.os_errors(base.text):
            names = [
                entry.name
                for entry in os.scandir(base.path)
                if entry.is_dir() and VERSION_RE.match(entry.name)
            ]
        return sorted({int(n) for n in names})

    def delete(self, loc: Location, *, missing_ok: bool) -> None:
        if loc.path == os.sep:
            raise InvalidUriError("Refusing to delete the filesystem root.", loc.text)
        if not os.path.lexists(loc.path):
            if missing_ok:
                return
            raise StorageNotFoundError("Nothing exists at this path.", loc.text)
        with localfs.os_errors(loc.text):
            localfs.remove(loc.path)

    def checksums(self, loc: Location) -> dict[str, str]:
        sums: dict[str, str] = {}
        with localfs.os_errors(loc.text):
            for folder, _, names in os.walk(loc.path):
                for name in names:
                    path = os.path.join(folder, name)
                    with open(path, "rb") as fh:
                        digest = hashlib.file_digest(fh, "md5").hexdigest()
                    sums[os.path.relpath(path, loc.path).replace(os.sep, "/")] = digest
        return sums

    # -- publishing (see backend.py) ------------------------------------------

    def begin(self, base: Location, owner: str = "") -> Staging:
        staging = new_staging(base, owner)
        staging.created_base = not os.path.isdir(base.path)
        return staging

    def stage(self, local_dir: str, staging: Staging) -> None:
        with localfs.os_errors(staging.base.text):
            os.makedirs(staging.base.path, exist_ok=True)
            os.mkdir(staging.tmp.path)
            staging.written.append(staging.tmp.path)
            shutil.copytree(
                local_dir, staging.tmp.path, copy_function=_copy_file, dirs_exist_ok=True
            )

    def commit(self, staging: Staging, final: Location) -> None:
        try:
            os.rename(staging.tmp.path, final.path)
        except OSError as err:
            if os.path.exists(final.path):
                raise StorageExistsError(
                    f"Version {final.name} appeared under '{staging.base.uri}' while publishing.",
                    final.uri,
                ) from err
            raise StorageError(
                f"Could not publish version {final.name}: {err}.", final.uri
            ) from err
        staging.committed.append(final.path)

    def rollback(self, staging: Staging) -> None:
        # Nothing was renamed into place unless commit succeeded, and commit
        # is the last step: only the private copy and a new base remain.
        shutil.rmtree(staging.tmp.path, ignore_errors=True)
        if staging.created_base:
            with contextlib.suppress(OSError):
                os.rmdir(staging.base.path)  # only if still empty

    def cleanup(self, staging: Staging) -> None:
        shutil.rmtree(staging.tmp.path, ignore_errors=True)
