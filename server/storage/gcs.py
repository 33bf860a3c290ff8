"""The Google Cloud Storage backend (``gs://bucket/key``), on google-cloud-storage.

GCS has no directories: a "directory" is every blob under ``key/``. A version
is published by uploading the tree under ``<base>/.tmp-<uuid>/``, then copying
each blob to ``<base>/<version>/`` with a job's publication marker first and
``saved_model.pb`` last (TF Serving treats a version as ready once that file
exists: it is the commit point; a killed publish leaves a version readers skip
and the job's next attempt rolls back, see server/pipeline/publish.py) and
``if_generation_match=0`` (never overwrite another writer's blob; a 412 on an
object whose content is ours, in a version marked as a job's, is the answer to
a copy of ours that succeeded, and counts as done), then removing the
temporary blobs.

``STORAGE_EMULATOR_HOST`` (e.g. gcp-storage-emulator in the tests) points the
lazily created client at an emulator with anonymous credentials.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import google.auth.exceptions as gauth
import requests
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type

from secateur.server.holds import hold
from secateur.server.storage import localfs
from secateur.server.storage.backend import (
    PUBLICATION_MARKER,
    SAVED_MODEL_FILE,
    VERSION_RE,
    Staging,
    new_staging,
    ordered_for_publish,
)
from secateur.server.storage.errors import (
    ByteBudget,
    InvalidUriError,
    StorageError,
    StorageExistsError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageUnreachableError,
    copy_counted,
)
from secateur.server.storage.location import WILDCARDS, Location, has_wildcard, is_under

__all__ = ["GcsBackend"]

logger = logging.getLogger(__name__)

# Read timeout for one HTTP exchange with GCS; the connect timeout and the retry
# deadline are ``timeout`` so an unreachable host fails within seconds.
_READ_TIMEOUT_S = 60.0
#: Bytes per ranged GET when an object is streamed (training data).
_READ_CHUNK = 8 * 1024 * 1024
_TRANSIENT = (
    gexc.TooManyRequests,
    gexc.InternalServerError,
    gexc.BadGateway,
    gexc.ServiceUnavailable,
    gexc.GatewayTimeout,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    ConnectionError,
)
_UNREACHABLE = (
    gexc.RetryError,
    gexc.ServerError,
    gexc.TooManyRequests,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    gauth.GoogleAuthError,
    ConnectionError,
    TimeoutError,
)


@contextlib.contextmanager
def gcs_errors(uri: str, *, writing: bool = False) -> Iterator[None]:
    """Map google-cloud / transport exceptions to :class:`StorageError` subclasses."""
    try:
        yield
    except StorageError:
        raise
    except gexc.NotFound as err:
        if writing:
            raise StorageUnreachableError(
                f"The bucket does not exist (or an object vanished while writing): {err}.", uri
            ) from err
        raise StorageNotFoundError(f"Nothing found in GCS: {err}.", uri) from err
    except (gexc.Forbidden, gexc.Unauthorized) as err:
        raise StoragePermissionError(f"GCS denied access: {err}.", uri) from err
    except gexc.PreconditionFailed as err:
        raise StorageExistsError(f"The target object already exists: {err}.", uri) from err
    except _UNREACHABLE as err:
        raise StorageUnreachableError(
            f"Google Cloud Storage cannot be reached ({type(err).__name__}: {err}).", uri
        ) from err
    except gexc.GoogleAPICallError as err:
        raise StorageError(f"Google Cloud Storage call failed: {err}.", uri) from err


class GcsBackend:
    """:class:`~secateur.server.storage.backend.Backend` for ``gs://``.

    Args:
        client: a ``google.cloud.storage.Client`` (or compatible); created
            lazily on first use otherwise.
        timeout: seconds for the connect timeout and for the retry deadline.
    """

    def __init__(self, client: Any | None = None, timeout: float = 5.0) -> None:
        self._gcs = client
        self._lock = threading.Lock()
        self._timeout: tuple[float, float] = (timeout, _READ_TIMEOUT_S)
        self._retry = Retry(
            predicate=if_exception_type(*_TRANSIENT),
            initial=0.25,
            maximum=1.0,
            multiplier=2.0,
            timeout=timeout,
        )

    @property
    def _kw(self) -> dict[str, Any]:
        return {"retry": self._retry, "timeout": self._timeout}

    def _client(self, uri: str) -> Any:
        if self._gcs is not None:
            return self._gcs
        with self._lock:
            if self._gcs is None:
                try:
                    from google.cloud import storage as gcs

                    if os.environ.get("STORAGE_EMULATOR_HOST"):
                        from google.auth.credentials import AnonymousCredentials

                        client = gcs.Client(project="test", credentials=AnonymousCredentials())
                    else:
                        client = gcs.Client()
                except Exception as err:
                    raise StorageUnreachableError(
                        f"Cannot create a Google Cloud Storage client ({type(err).__name__}: "
                        f"{err}); check credentials and project.",
                        uri,
                    ) from err
                self._gcs = client
        return self._gcs

    def _bucket(self, loc: Location) -> Any:
        return self._client(loc.text).bucket(loc.bucket)

    def _list(
        self, loc: Location, prefix: str, delimiter: str | None = None
    ) -> tuple[list[Any], set[str]]:
        """A consumed listing (blobs fetched, ``prefixes`` filled)."""
        with gcs_errors(loc.text):
            iterator = self._client(loc.text).list_blobs(
                loc.bucket, prefix=prefix, delimiter=delimiter, **self._kw
            )
            blobs = list(iterator)
        return blobs, set(getattr(iterator, "prefixes", ()) or ())

    def _blob_exists(self, loc: Location) -> bool:
        with gcs_errors(loc.text):
            return bool(self._bucket(loc).blob(loc.path).exists(**self._kw))

    def _tree(self, loc: Location) -> list[Any]:
        """Blobs strictly under ``loc`` as a directory (``key/...``); marker blobs skipped."""
        blobs, _ = self._list(loc, f"{loc.path}/" if loc.path else "")
        return [b for b in blobs if not b.name.endswith("/")]

    def _delete_names(self, loc: Location, names: Sequence[str]) -> list[str]:
        """Best-effort deletion; returns the names that could not be deleted."""
        if not names:
            return []
        try:
            bucket = self._bucket(loc)
        except StorageError:
            return list(names)
        failed: list[str] = []
        for name in names:
            try:
                bucket.blob(name).delete(**self._kw)
            except gexc.NotFound:
                pass
            except Exception as err:  # noqa: BLE001 - best-effort cleanup, reported below
                logger.warning("Could not delete gs://%s/%s: %s", loc.bucket, name, err)
                failed.append(name)
        return failed

    # -- reading and writing --------------------------------------------------

    def exists(self, loc: Location) -> bool:
        if not loc.path:
            with gcs_errors(loc.text):
                return bool(self._client(loc.text).bucket(loc.bucket).exists(**self._kw))
        if self._blob_exists(loc):
            return True
        try:
            with gcs_errors(loc.text):
                iterator = self._client(loc.text).list_blobs(
                    loc.bucket, prefix=f"{loc.path}/", max_results=1, **self._kw
                )
                return any(True for _ in iterator)
        except StorageNotFoundError:  # bucket missing
            return False

    def glob(self, pattern: Location) -> list[Location]:
        key = pattern.path
        if not has_wildcard(key):
            return [Location("gs", key, pattern.bucket)] if self.exists(pattern) else []
        literal = key[: min(key.index(c) for c in WILDCARDS if c in key)]
        pat_parts = key.split("/")
        blobs, _ = self._list(pattern, literal)
        found: set[str] = set()
        for blob in blobs:
            parts = blob.name.rstrip("/").split("/")
            if len(parts) < len(pat_parts):
                continue
            candidate = parts[: len(pat_parts)]
            if all(
                fnmatch.fnmatchcase(name, pat) and (not name.startswith(".") or pat.startswith("."))
                for name, pat in zip(candidate, pat_parts)
            ):
                found.add("/".join(candidate))
        return [Location("gs", k, pattern.bucket) for k in sorted(found)]

    def read_bytes(self, loc: Location) -> bytes:
        if not loc.path:
            raise StorageNotFoundError("A bucket is not an object; name an object.", loc.text)
        with gcs_errors(loc.text):
            data: bytes = self._bucket(loc).blob(loc.path).download_as_bytes(**self._kw)
        return data

    @contextlib.contextmanager
    def open_read(self, loc: Location) -> Iterator[BinaryIO]:
        """The object streamed in ``_READ_CHUNK`` ranged reads (no local copy)."""
        if not loc.path:
            raise StorageNotFoundError("A bucket is not an object; name an object.", loc.text)
        with gcs_errors(loc.text):
            blob = self._bucket(loc).blob(loc.path)
            with blob.open("rb", chunk_size=_READ_CHUNK, **self._kw) as reader:
                yield reader

    def write_bytes(self, loc: Location, data: bytes) -> None:
        if not loc.path:
            raise InvalidUriError("Cannot write to a bucket; name an object.", loc.text)
        with gcs_errors(loc.text, writing=True):
            self._bucket(loc).blob(loc.path).upload_from_string(data, **self._kw)

    def download(self, loc: Location, target: str, budget: ByteBudget | None = None) -> None:
        # An exact object first, then a prefix ("directory").
        if loc.path and self._blob_exists(loc):
            blob = self._bucket(loc).blob(loc.path)
            with localfs.os_errors(loc.text), gcs_errors(loc.text):
                localfs.replace_file(target, lambda tmp: self._fetch(blob, tmp, budget))
            return
        blobs = self._tree(loc)
        if not blobs:
            raise StorageNotFoundError("No object or prefix exists at this URI.", loc.text)
        prefix_len = len(loc.path) + 1 if loc.path else 0

        def fill(tmp: str) -> None:
            root = os.path.realpath(tmp)
            for blob in blobs:
                dest = os.path.realpath(os.path.join(root, *blob.name[prefix_len:].split("/")))
                if not is_under(dest, root) or dest == root:
                    raise StoragePermissionError(
                        f"Object name '{blob.name}' would escape the download directory.",
                        loc.text,
                    )
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with gcs_errors(loc.text):
                    self._fetch(blob, dest, budget)

        localfs.fill_tree(target, loc.text, fill)

    def _fetch(self, blob: Any, dest: str, budget: ByteBudget | None) -> None:
        """One object to ``dest``; with a budget, streamed in chunks and counted as they come."""
        if budget is None:
            blob.download_to_filename(dest, **self._kw)
            return
        with blob.open("rb", chunk_size=_READ_CHUNK, **self._kw) as reader, open(dest, "wb") as out:
            copy_counted(reader.read, out.write, budget, _READ_CHUNK)

    def list_versions(self, base: Location) -> list[int]:
        prefix = f"{base.path}/" if base.path else ""
        try:
            _, prefixes = self._list(base, prefix, delimiter="/")
        except StorageNotFoundError:  # bucket missing
            return []
        names = (sub[len(prefix) :].rstrip("/") for sub in prefixes)
        return sorted({int(n) for n in names if VERSION_RE.match(n)})

    def delete(self, loc: Location, *, missing_ok: bool) -> None:
        if not loc.path:
            raise InvalidUriError("Refusing to delete a whole bucket; name a path in it.", loc.text)
        try:
            names = [b.name for b in self._list(loc, f"{loc.path}/")[0]]
        except StorageNotFoundError:  # bucket missing
            names = []
        if self._blob_exists(loc):
            names.append(loc.path)
        if not names:
            if missing_ok:
                return
            raise StorageNotFoundError("No object or prefix exists at this URI.", loc.text)
        with gcs_errors(loc.text, writing=True):
            bucket = self._bucket(loc)
            for name in names:
                with contextlib.suppress(gexc.NotFound):
                    bucket.blob(name).delete(**self._kw)

    def checksums(self, loc: Location) -> dict[str, str]:
        cut = len(loc.path) + 1
        return {b.name[cut:]: _md5_hex(b) for b in self._tree(loc)}

    # -- publishing (see backend.py) ------------------------------------------

    def begin(self, base: Location, owner: str = "") -> Staging:
        return new_staging(base, owner)

    def stage(self, local_dir: str, staging: Staging) -> None:
        staging.files = ordered_for_publish(localfs.tree_files(local_dir))
        if not staging.files:
            raise StorageNotFoundError(
                "The directory to publish holds no files (GCS has no empty directories).",
                local_dir,
            )
        bucket = self._bucket(staging.base)
        for rel in staging.files:
            name = f"{staging.tmp.path}/{rel}"
            with gcs_errors(f"gs://{staging.base.bucket}/{name}", writing=True):
                staging.written.append(name)
                bucket.blob(name).upload_from_filename(
                    os.path.join(local_dir, *rel.split("/")), **self._kw
                )

    def commit(self, staging: Staging, final: Location) -> None:
        bucket = self._bucket(staging.base)
        for rel in staging.files:  # the marker first, saved_model.pb last: the commit point
            name = f"{final.path}/{rel}"
            if rel.rsplit("/", 1)[-1] == SAVED_MODEL_FILE:
                hold("before_pb")  # a test hook (server/holds.py)
            with gcs_errors(f"gs://{final.bucket}/{name}", writing=True):
                source = bucket.blob(f"{staging.tmp.path}/{rel}")
                staging.committed.append(name)
                try:
                    # if_generation_match=0: never overwrite another writer's blob
                    bucket.copy_blob(source, bucket, name, if_generation_match=0, **self._kw)
                except gexc.PreconditionFailed:
                    if not self._same_content(staging, source, name):
                        staging.committed.pop()  # not ours: leave it alone
                        raise

    def _same_content(self, staging: Staging, source: Any, name: str) -> bool:
        """After a 412 on ``name``: is it our own copy? (the response to a copy that
        succeeded was lost and the copy retried, or an earlier attempt of the same
        job copied it). Only a version this publish marks as a job's (its marker, the
        first file, is ours: the job id is in it) can hold objects of ours."""
        if PUBLICATION_MARKER not in staging.files:
            return False
        bucket = self._bucket(staging.base)
        there = bucket.get_blob(name, **self._kw)
        source = bucket.get_blob(source.name, **self._kw)
        if there is None or source is None or not there.md5_hash:
            return False
        same = there.md5_hash == source.md5_hash and there.size == source.size
        if same:
            logger.info("gs://%s/%s was already there with our content: kept", bucket.name, name)
        return bool(same)

    def rollback(self, staging: Staging) -> None:
        failed = self._delete_names(staging.base, staging.committed + staging.written)
        if failed:
            logger.error(
                "Publishing under %s failed and %d blobs could not be removed: %s",
                staging.base.uri,
                len(failed),
                failed[:10],
            )

    def cleanup(self, staging: Staging) -> None:
        leftover = self._delete_names(staging.base, staging.written)
        if leftover:
            logger.warning(
                "Published under %s but could not remove %d temporary blobs under %s",
                staging.base.uri,
                len(leftover),
                staging.tmp.uri,
            )


def _md5_hex(blob: Any) -> str:
    """A listed blob's MD5 as hex ("" when GCS keeps none: a composite object)."""
    return base64.b64decode(blob.md5_hash).hex() if blob.md5_hash else ""
