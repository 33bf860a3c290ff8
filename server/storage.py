"""Storage by URI: local paths, ``file://`` URIs and ``gs://`` (Google Cloud Storage).

One class, :class:`Storage`, reads, lists, writes and publishes models wherever a
URI points. Three kinds of URI are understood:

* a local path, absolute or relative (``/models/vgg``, ``runs/out``);
* ``file:///models/vgg`` (``file://localhost/...`` too), the same as the path;
* ``gs://bucket/some/prefix``.

Anything else (``s3://``, ``http://``, an empty string, ``gs://`` without a
bucket, ...) raises :class:`InvalidUriError`.

Allow-list: ``Storage(allowed_prefixes=[...])`` restricts every public method to
URIs that, once normalised, equal a prefix or lie under it on a path-component
boundary (``/data`` allows ``/data/x``, not ``/database``). Local paths and
``file://`` URIs are normalised with :func:`os.path.realpath`, so ``..`` and
symlinks cannot escape; files reached through a symlink inside a copied tree
are checked one by one. ``gs://`` URIs are kept as ``gs://bucket/key``.

Publishing follows the TF Serving layout ``<base>/<version>/``: a version is
written under a temporary sibling (``<base>/.tmp-<uuid>``) and only then made
visible -- by one ``os.rename`` locally, and on GCS by copying the blobs with
``saved_model.pb`` last (TF Serving treats a version as ready once that file
is there). A failure removes whatever was written.

Errors (all carry the offending URI as ``.uri``; messages end with
``Received: <uri>``)::

    StorageError(Exception)
    ├── StorageNotFoundError       nothing at the URI
    ├── StoragePermissionError     URI outside the allow-list, or access denied
    ├── StorageExistsError         the target version already exists
    ├── StorageUnreachableError    host or bucket cannot be reached, network error,
    │                              bucket missing when writing, no credentials
    └── InvalidUriError            unsupported scheme or malformed URI
                                   (also a ValueError)

This module never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob as globlib
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import google.auth.exceptions as gauth
import requests
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type

__all__ = [
    "InvalidUriError",
    "Storage",
    "StorageError",
    "StorageExistsError",
    "StorageNotFoundError",
    "StoragePermissionError",
    "StorageUnreachableError",
]

logger = logging.getLogger(__name__)

#: Name of the file TF Serving waits for; published last on GCS.
SAVED_MODEL_FILE = "saved_model.pb"
#: Prefix of the temporary siblings used while publishing.
TMP_PREFIX = ".tmp-"

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_VERSION_RE = re.compile(r"^[0-9]+$")
_WILDCARDS = "*?["
# Read timeout for one HTTP exchange with GCS; the connect timeout and the retry
# deadline are ``gcs_timeout`` so an unreachable host fails within seconds.
_GCS_READ_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- errors


class StorageError(Exception):
    """Base of every storage error; ``.uri`` is the URI concerned."""

    def __init__(self, message: str, uri: str) -> None:
        self.uri = uri
        super().__init__(f"{message.rstrip()} Received: {uri}")


class StorageNotFoundError(StorageError):
    """Nothing exists at the URI."""


class StoragePermissionError(StorageError):
    """The URI lies outside the allow-list, or the backend denied access."""


class StorageExistsError(StorageError):
    """The target (a model version) already exists; nothing was written."""


class StorageUnreachableError(StorageError):
    """The host or bucket cannot be reached (network error, missing bucket, no credentials)."""


class InvalidUriError(StorageError, ValueError):
    """The URI is malformed or uses an unsupported scheme."""


# --------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class _Loc:
    """A parsed, normalised URI: either a local real path or a GCS bucket + key."""

    kind: str  # "local" or "gs"
    path: str = ""  # local: absolute real path
    bucket: str = ""  # gs: bucket name
    key: str = ""  # gs: object key or prefix, no leading/trailing "/"

    @property
    def uri(self) -> str:
        if self.kind == "local":
            return self.path
        return f"gs://{self.bucket}/{self.key}" if self.key else f"gs://{self.bucket}"

    @property
    def basename(self) -> str:
        if self.kind == "local":
            return os.path.basename(self.path.rstrip(os.sep)) or os.sep
        return self.key.rsplit("/", 1)[-1] if self.key else self.bucket

    def child(self, name: str) -> _Loc:
        if self.kind == "local":
            return _Loc("local", path=os.path.join(self.path, name))
        key = f"{self.key}/{name}" if self.key else name
        return _Loc("gs", bucket=self.bucket, key=key)


def _split_scheme(uri: str) -> tuple[str, str]:
    """Return ``(scheme, rest)``; scheme is "" for a plain path."""
    if not isinstance(uri, str):
        raise InvalidUriError(
            f"A storage URI must be a string, not {type(uri).__name__}.", repr(uri)
        )
    if not uri or not uri.strip():
        raise InvalidUriError("A storage URI must not be empty.", repr(uri))
    if "\x00" in uri:
        raise InvalidUriError("A storage URI must not contain NUL characters.", repr(uri))
    match = _SCHEME_RE.match(uri)
    if match is None:
        return "", uri
    return match.group(1).lower(), uri


def _parse_gs(uri: str) -> _Loc:
    rest = uri[len("gs://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InvalidUriError("A gs:// URI must name a bucket: gs://<bucket>/<path>.", uri)
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidUriError(
            "A GCS bucket name must be 3-222 characters of lowercase letters, digits, "
            "'-', '_' and '.', starting and ending with a letter or digit.",
            uri,
        )
    key = key.strip("/")
    if any(part in (".", "..") for part in key.split("/")):
        raise InvalidUriError("A gs:// object path must not contain '.' or '..' segments.", uri)
    if any(c in key for c in "\r\n"):
        raise InvalidUriError("A gs:// object path must not contain line breaks.", uri)
    return _Loc("gs", bucket=bucket, key=key)


def _local_path(uri: str, scheme: str) -> str:
    """The local path (not yet resolved) named by a plain path or a file:// URI."""
    if scheme == "":
        return uri
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise InvalidUriError(
            "A file:// URI must be absolute with no host: file:///<path> "
            "(or file://localhost/<path>).",
            uri,
        )
    if parts.query or parts.fragment:
        raise InvalidUriError("A file:// URI must not have a query or a fragment.", uri)
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise InvalidUriError("A file:// URI must hold an absolute path.", uri)
    return path


def _parse(uri: str) -> _Loc:
    scheme, _ = _split_scheme(uri)
    if scheme == "gs":
        return _parse_gs(uri)
    if scheme in ("", "file"):
        return _Loc("local", path=os.path.realpath(_local_path(uri, scheme)))
    raise InvalidUriError(
        f"Unsupported URI scheme '{scheme}://'; use a local path, file:// or gs://.", uri
    )


def _is_under(uri: str, prefix: str) -> bool:
    """True when ``uri`` equals ``prefix`` or lies under it on a '/' boundary."""
    if uri == prefix:
        return True
    return uri.startswith(prefix.rstrip("/") + "/")


def _has_wildcard(text: str) -> bool:
    return any(c in text for c in _WILDCARDS)


def _ordered_for_publish(rel_paths: Sequence[str]) -> list[str]:
    """Sorted relative paths with every ``saved_model.pb`` moved to the end."""
    ordered = sorted(rel_paths)
    last = [p for p in ordered if p.rsplit("/", 1)[-1] == SAVED_MODEL_FILE]
    return [p for p in ordered if p not in last] + last


def _local_files(local_dir: str) -> list[str]:
    """Relative POSIX paths of every file under ``local_dir`` (symlinks followed)."""
    files: list[str] = []
    for root, _dirs, names in os.walk(local_dir, followlinks=True):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir)
            files.append(rel.replace(os.sep, "/"))
    return files


def _copy_file(src: str, dst: str) -> None:
    """Copy one file (content and metadata); a seam for tests."""
    shutil.copy2(src, dst)


def _remove_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


# --------------------------------------------------------------------------- Storage


class Storage:
    """Read, list, write and publish by URI (local path, ``file://``, ``gs://``).

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
    ) -> None:
        if isinstance(allowed_prefixes, str):
            raise TypeError(
                "allowed_prefixes must be a sequence of URIs, not a single string. "
                f"Received: {allowed_prefixes!r}"
            )
        self._allowed: tuple[str, ...] | None = (
            None if allowed_prefixes is None else tuple(_parse(p).uri for p in allowed_prefixes)
        )
        self._gcs_client = gcs_client
        self._client_lock = threading.Lock()
        self._timeout: tuple[float, float] = (gcs_timeout, _GCS_READ_TIMEOUT_S)
        self._retry = Retry(
            predicate=if_exception_type(
                gexc.TooManyRequests,
                gexc.InternalServerError,
                gexc.BadGateway,
                gexc.ServiceUnavailable,
                gexc.GatewayTimeout,
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                ConnectionError,
            ),
            initial=0.25,
            maximum=1.0,
            multiplier=2.0,
            timeout=gcs_timeout,
        )

    @property
    def allowed_prefixes(self) -> tuple[str, ...] | None:
        """The normalised allow-list, or ``None`` when everything is allowed."""
        return self._allowed

    # ----------------------------------------------------------------- helpers

    def _check(self, uri: str) -> _Loc:
        """Parse ``uri`` and enforce the allow-list."""
        loc = _parse(uri)
        self._check_loc(loc, uri)
        return loc

    def _check_loc(self, loc: _Loc, uri: str) -> None:
        if self._allowed is None:
            return
        normalized = loc.uri
        if not any(_is_under(normalized, prefix) for prefix in self._allowed):
            raise StoragePermissionError(
                f"The URI must lie within the allowed prefixes {list(self._allowed)} "
                f"(normalised to '{normalized}').",
                uri,
            )

    def _is_allowed_path(self, path: str) -> bool:
        if self._allowed is None:
            return True
        real = os.path.realpath(path)
        return any(_is_under(real, prefix) for prefix in self._allowed)

    def _client(self, uri: str) -> Any:
        if self._gcs_client is not None:
            return self._gcs_client
        with self._client_lock:
            if self._gcs_client is None:
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
                self._gcs_client = client
        return self._gcs_client

    def _bucket(self, loc: _Loc, uri: str) -> Any:
        return self._client(uri).bucket(loc.bucket)

    @contextlib.contextmanager
    def _gcs_errors(self, uri: str, *, writing: bool = False) -> Iterator[None]:
        """Map google-cloud / transport exceptions to :class:`StorageError` subclasses."""
        try:
            yield
        except StorageError:
            raise
        except gexc.NotFound as err:
            if writing:
                raise StorageUnreachableError(
                    f"The bucket does not exist (or an object vanished while writing): {err}.",
                    uri,
                ) from err
            raise StorageNotFoundError(f"Nothing found in GCS: {err}.", uri) from err
        except (gexc.Forbidden, gexc.Unauthorized) as err:
            raise StoragePermissionError(f"GCS denied access: {err}.", uri) from err
        except gexc.PreconditionFailed as err:
            raise StorageExistsError(f"The target object already exists: {err}.", uri) from err
        except (
            gexc.RetryError,
            gexc.ServerError,
            gexc.TooManyRequests,
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            gauth.GoogleAuthError,
            ConnectionError,
            TimeoutError,
        ) as err:
            raise StorageUnreachableError(
                f"Google Cloud Storage cannot be reached ({type(err).__name__}: {err}).", uri
            ) from err
        except gexc.GoogleAPICallError as err:
            raise StorageError(f"Google Cloud Storage call failed: {err}.", uri) from err

    @contextlib.contextmanager
    def _os_errors(self, uri: str) -> Iterator[None]:
        """Map OS exceptions to :class:`StorageError` subclasses."""
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError as err:
            raise StorageNotFoundError(f"No such file or directory: {err}.", uri) from err
        except PermissionError as err:
            raise StoragePermissionError(f"The filesystem denied access: {err}.", uri) from err
        except shutil.Error as err:
            raise StorageError(f"Copy failed: {err}.", uri) from err
        except OSError as err:
            raise StorageError(f"Filesystem error: {err}.", uri) from err

    def _gs_list(
        self, loc: _Loc, uri: str, prefix: str, delimiter: str | None = None
    ) -> tuple[list[Any], set[str]]:
        """A consumed listing iterator (blobs fetched, ``.prefixes`` filled)."""
        with self._gcs_errors(uri):
            iterator = self._client(uri).list_blobs(
                loc.bucket,
                prefix=prefix,
                delimiter=delimiter,
                retry=self._retry,
                timeout=self._timeout,
            )
            blobs = list(iterator)
        return blobs, set(getattr(iterator, "prefixes", ()) or ())

    def _gs_blob_exists(self, loc: _Loc, uri: str) -> bool:
        with self._gcs_errors(uri):
            return bool(
                self._bucket(loc, uri)
                .blob(loc.key)
                .exists(retry=self._retry, timeout=self._timeout)
            )

    def _gs_tree(self, loc: _Loc, uri: str) -> list[Any]:
        """Blobs strictly under ``loc`` as a directory (``key/...``); marker blobs skipped."""
        prefix = f"{loc.key}/" if loc.key else ""
        blobs, _ = self._gs_list(loc, uri, prefix)
        return [b for b in blobs if not b.name.endswith("/")]

    def _gs_delete_names(self, loc: _Loc, uri: str, names: Sequence[str]) -> list[str]:
        """Best-effort deletion; returns the names that could not be deleted."""
        failed: list[str] = []
        if not names:
            return failed
        try:
            bucket = self._bucket(loc, uri)
        except StorageError:
            return list(names)
        for name in names:
            try:
                bucket.blob(name).delete(retry=self._retry, timeout=self._timeout)
            except gexc.NotFound:
                pass
            except Exception as err:  # noqa: BLE001 - best-effort cleanup, reported below
                logger.warning("Could not delete gs://%s/%s: %s", loc.bucket, name, err)
                failed.append(name)
        return failed

    # ----------------------------------------------------------------- public API

    def normalize(self, uri: str) -> str:
        """The normalised form of ``uri`` (real absolute path, or ``gs://bucket/key``)."""
        return self._check(uri).uri

    def within(self, uri: str, container: str) -> bool:
        """True when ``uri`` is ``container`` or lies under it, both normalised.

        ``file://``, trailing slashes, ``..`` and symlinks (locally) are
        resolved first, so two spellings of one place compare equal; a local
        path never lies within a ``gs://`` URI or the other way round.
        """
        inner, outer = self._check(uri), self._check(container)
        return inner.kind == outer.kind and _is_under(inner.uri, outer.uri)

    def is_allowed(self, uri: str) -> bool:
        """True when ``uri`` is valid and lies within the allow-list."""
        try:
            self._check(uri)
        except StoragePermissionError:
            return False
        return True

    def exists(self, uri: str) -> bool:
        """True when a file or a directory (on GCS: any blob under ``uri/``) exists."""
        loc = self._check(uri)
        if loc.kind == "local":
            return os.path.exists(loc.path)
        if not loc.key:
            with self._gcs_errors(uri):
                return bool(
                    self._client(uri)
                    .bucket(loc.bucket)
                    .exists(retry=self._retry, timeout=self._timeout)
                )
        if self._gs_blob_exists(loc, uri):
            return True
        try:
            with self._gcs_errors(uri):
                iterator = self._client(uri).list_blobs(
                    loc.bucket,
                    prefix=f"{loc.key}/",
                    max_results=1,
                    retry=self._retry,
                    timeout=self._timeout,
                )
                return any(True for _ in iterator)
        except StorageNotFoundError:  # bucket missing
            return False

    def download(self, uri: str, local_dir: str) -> str:
        """Copy a file or a directory tree into ``local_dir``; return the local copy's path.

        The copy keeps the basename of ``uri`` and replaces a same-named entry
        already in ``local_dir``. A tree is assembled in a temporary sibling
        first, so a failure leaves no partial copy behind.
        """
        loc = self._check(uri)
        os.makedirs(local_dir, exist_ok=True)
        target = os.path.join(local_dir, loc.basename)
        if loc.kind == "local":
            if not os.path.exists(loc.path):
                raise StorageNotFoundError("Nothing exists at this path.", uri)
            if os.path.realpath(target) == loc.path:
                return target  # already there
            if os.path.isdir(loc.path) and _is_under(os.path.realpath(local_dir), loc.path):
                raise StorageError(f"Cannot download a directory into itself ('{local_dir}').", uri)
            if os.path.isdir(loc.path):
                self._fill_tree(target, uri, lambda tmp: self._copy_local_tree(loc.path, tmp, uri))
            else:
                with self._os_errors(uri):
                    self._replace_file(target, lambda tmp: _copy_file(loc.path, tmp))
            return target

        # gs://: an exact object first, then a prefix ("directory").
        if loc.key and self._gs_blob_exists(loc, uri):
            blob = self._bucket(loc, uri).blob(loc.key)
            with self._os_errors(uri), self._gcs_errors(uri):
                self._replace_file(
                    target,
                    lambda tmp: blob.download_to_filename(
                        tmp, retry=self._retry, timeout=self._timeout
                    ),
                )
            return target
        blobs = self._gs_tree(loc, uri)
        if not blobs:
            raise StorageNotFoundError("No object or prefix exists at this URI.", uri)
        prefix_len = len(loc.key) + 1 if loc.key else 0

        def fill(tmp: str) -> None:
            root = os.path.realpath(tmp)
            for blob in blobs:
                rel = blob.name[prefix_len:]
                dest = os.path.realpath(os.path.join(root, *rel.split("/")))
                if not _is_under(dest, root) or dest == root:
                    raise StoragePermissionError(
                        f"Object name '{blob.name}' would escape the download directory.", uri
                    )
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with self._gcs_errors(uri):
                    blob.download_to_filename(dest, retry=self._retry, timeout=self._timeout)

        self._fill_tree(target, uri, fill)
        return target

    def glob(self, pattern: str) -> list[str]:
        """Sorted URIs matching ``pattern`` (``*``, ``?``, ``[...]`` within one path segment).

        The pattern itself must lie within the allow-list; local matches whose
        real path escapes it are left out. Hidden entries (names starting with
        ``.``) match only a pattern segment that starts with ``.`` too. Local
        matches come back as absolute paths (``file://`` URIs for a ``file://``
        pattern), GCS matches as ``gs://bucket/key``. Raises
        :class:`StorageNotFoundError` when nothing matches.
        """
        loc = self._check(pattern)
        if loc.kind == "local":
            scheme, _ = _split_scheme(pattern)
            path = os.path.abspath(_local_path(pattern, scheme))
            matches = sorted(
                m for m in globlib.glob(path) if self._is_allowed_path(m) and os.path.exists(m)
            )
            if not matches:
                raise StorageNotFoundError("No file or directory matches the pattern.", pattern)
            if scheme == "file":
                return [f"file://{m}" for m in matches]
            return matches

        if not _has_wildcard(loc.key):
            if self.exists(loc.uri):
                return [loc.uri]
            raise StorageNotFoundError("No object or prefix matches the pattern.", pattern)
        first = min(loc.key.index(c) for c in _WILDCARDS if c in loc.key)
        literal = loc.key[:first]
        pat_parts = loc.key.split("/")
        blobs, _ = self._gs_list(loc, pattern, literal)
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
        if not found:
            raise StorageNotFoundError("No object or prefix matches the pattern.", pattern)
        return sorted(f"gs://{loc.bucket}/{key}" for key in found)

    def read_bytes(self, uri: str) -> bytes:
        """The whole content of one file or object."""
        loc = self._check(uri)
        if loc.kind == "local":
            if os.path.isdir(loc.path):
                raise StorageNotFoundError("Expected a file but found a directory.", uri)
            with self._os_errors(uri), open(loc.path, "rb") as handle:
                return handle.read()
        if not loc.key:
            raise StorageNotFoundError("A bucket is not an object; name an object.", uri)
        with self._gcs_errors(uri):
            blob = self._bucket(loc, uri).blob(loc.key)
            data: bytes = blob.download_as_bytes(retry=self._retry, timeout=self._timeout)
        return data

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write ``data`` to one file or object, replacing it (atomically for local files)."""
        loc = self._check(uri)
        if loc.kind == "local":
            with self._os_errors(uri):
                parent = os.path.dirname(loc.path)
                os.makedirs(parent, exist_ok=True)
                self._replace_file(loc.path, lambda tmp: self._write_file(tmp, data))
            return
        if not loc.key:
            raise InvalidUriError("Cannot write to a bucket; name an object.", uri)
        with self._gcs_errors(uri, writing=True):
            blob = self._bucket(loc, uri).blob(loc.key)
            blob.upload_from_string(data, retry=self._retry, timeout=self._timeout)

    def list_versions(self, base_uri: str) -> list[int]:
        """Sorted integer-named children of ``base_uri`` (``<base>/<version>/``); [] if none."""
        loc = self._check(base_uri)
        if loc.kind == "local":
            if not os.path.isdir(loc.path):
                return []
            with self._os_errors(base_uri):
                names = [
                    entry.name
                    for entry in os.scandir(loc.path)
                    if entry.is_dir() and _VERSION_RE.match(entry.name)
                ]
            return sorted({int(n) for n in names})
        prefix = f"{loc.key}/" if loc.key else ""
        try:
            _, prefixes = self._gs_list(loc, base_uri, prefix, delimiter="/")
        except StorageNotFoundError:  # bucket missing
            return []
        versions = set()
        for sub in prefixes:
            name = sub[len(prefix) :].rstrip("/")
            if _VERSION_RE.match(name):
                versions.add(int(name))
        return sorted(versions)

    def next_version(self, base_uri: str) -> int:
        """The highest existing version plus one, or 1."""
        versions = self.list_versions(base_uri)
        return versions[-1] + 1 if versions else 1

    def publish_dir(self, local_dir: str, base_uri: str, version: int | None = None) -> str:
        """Publish the tree ``local_dir`` as ``<base_uri>/<version>/`` and return that URI.

        ``version=None`` takes :meth:`next_version`. An existing version raises
        :class:`StorageExistsError` and nothing is written. Readers never see a
        half-written version: the tree goes to ``<base>/.tmp-<uuid>`` first and
        is then renamed (local) or copied with ``saved_model.pb`` last (GCS). Any
        failure removes what was written.
        """
        loc = self._check(base_uri)
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 0
        ):
            raise InvalidUriError(
                f"A version must be a non-negative integer, not {version!r}.", base_uri
            )
        if not os.path.isdir(local_dir):
            raise StorageNotFoundError("The directory to publish does not exist.", local_dir)
        if version is None:
            version = self.next_version(base_uri)
        final = loc.child(str(version))
        self._check_version_free(loc, base_uri, version, final)
        if loc.kind == "local":
            self._publish_local(local_dir, loc, base_uri, version, final)
        else:
            self._publish_gs(local_dir, loc, base_uri, version, final)
        return final.uri

    def delete(self, uri: str, *, missing_ok: bool = False) -> None:
        """Delete a file or a whole tree (on GCS: the object and every blob under ``uri/``)."""
        loc = self._check(uri)
        if loc.kind == "local":
            if loc.path == os.sep:
                raise InvalidUriError("Refusing to delete the filesystem root.", uri)
            if not os.path.lexists(loc.path):
                if missing_ok:
                    return
                raise StorageNotFoundError("Nothing exists at this path.", uri)
            with self._os_errors(uri):
                _remove_local(loc.path)
            return
        if not loc.key:
            raise InvalidUriError("Refusing to delete a whole bucket; name a path in it.", uri)
        try:
            names = [b.name for b in self._gs_list(loc, uri, f"{loc.key}/")[0]]
        except StorageNotFoundError:  # bucket missing
            names = []
        if self._gs_blob_exists(loc, uri):
            names.append(loc.key)
        if not names:
            if missing_ok:
                return
            raise StorageNotFoundError("No object or prefix exists at this URI.", uri)
        with self._gcs_errors(uri, writing=True):
            bucket = self._bucket(loc, uri)
            for name in names:
                with contextlib.suppress(gexc.NotFound):
                    bucket.blob(name).delete(retry=self._retry, timeout=self._timeout)

    # ----------------------------------------------------------------- internals

    @staticmethod
    def _write_file(path: str, data: bytes) -> None:
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    @staticmethod
    def _replace_file(target: str, fill: Callable[[str], Any]) -> None:
        """Write ``target`` through a temporary sibling file and ``os.replace``."""
        parent = os.path.dirname(target) or "."
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=TMP_PREFIX)
        os.close(fd)
        try:
            fill(tmp)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def _fill_tree(self, target: str, uri: str, fill: Callable[[str], None]) -> None:
        """Build a directory in a temporary sibling, then put it at ``target``."""
        parent = os.path.dirname(target)
        tmp = os.path.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            with self._os_errors(uri):
                os.makedirs(tmp)
                fill(tmp)
                if os.path.lexists(target):
                    _remove_local(target)
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _copy_local_tree(self, src: str, dst: str, uri: str) -> None:
        """Copy ``src`` into the existing ``dst``, refusing files outside the allow-list."""

        def copy_one(source: str, dest: str) -> None:
            if not self._is_allowed_path(source):
                raise StoragePermissionError(
                    f"'{source}' resolves outside the allowed prefixes "
                    f"(to '{os.path.realpath(source)}').",
                    uri,
                )
            _copy_file(source, dest)

        shutil.copytree(src, dst, copy_function=copy_one, dirs_exist_ok=True)

    def _check_version_free(self, loc: _Loc, base_uri: str, version: int, final: _Loc) -> None:
        if version in self.list_versions(base_uri) or self.exists(final.uri):
            raise StorageExistsError(
                f"Version {version} already exists under '{loc.uri}'; versions are never "
                "overwritten.",
                final.uri,
            )

    def _publish_local(
        self, local_dir: str, loc: _Loc, base_uri: str, version: int, final: _Loc
    ) -> None:
        created_base = not os.path.isdir(loc.path)
        tmp = os.path.join(loc.path, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            with self._os_errors(base_uri):
                os.makedirs(loc.path, exist_ok=True)
                os.mkdir(tmp)
                shutil.copytree(local_dir, tmp, copy_function=_copy_file, dirs_exist_ok=True)
            self._check_version_free(loc, base_uri, version, final)
            try:
                os.rename(tmp, final.path)
            except OSError as err:
                if os.path.exists(final.path):
                    raise StorageExistsError(
                        f"Version {version} appeared under '{loc.uri}' while publishing.",
                        final.uri,
                    ) from err
                raise StorageError(
                    f"Could not publish version {version}: {err}.", final.uri
                ) from err
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if created_base:
                with contextlib.suppress(OSError):
                    os.rmdir(loc.path)  # only if still empty
            raise

    def _publish_gs(
        self, local_dir: str, loc: _Loc, base_uri: str, version: int, final: _Loc
    ) -> None:
        files = _ordered_for_publish(_local_files(local_dir))
        if not files:
            raise StorageNotFoundError(
                "The directory to publish holds no files (GCS has no empty directories).",
                local_dir,
            )
        tmp = loc.child(f"{TMP_PREFIX}{uuid.uuid4().hex}")
        written_tmp: list[str] = []
        written_final: list[str] = []
        try:
            bucket = self._bucket(loc, base_uri)
            for rel in files:
                name = f"{tmp.key}/{rel}"
                with self._gcs_errors(f"gs://{loc.bucket}/{name}", writing=True):
                    written_tmp.append(name)
                    bucket.blob(name).upload_from_filename(
                        os.path.join(local_dir, *rel.split("/")),
                        retry=self._retry,
                        timeout=self._timeout,
                    )
            self._check_version_free(loc, base_uri, version, final)
            for rel in files:  # saved_model.pb last
                name = f"{final.key}/{rel}"
                with self._gcs_errors(f"gs://{loc.bucket}/{name}", writing=True):
                    source = bucket.blob(f"{tmp.key}/{rel}")
                    written_final.append(name)
                    try:
                        bucket.copy_blob(
                            source,
                            bucket,
                            name,
                            if_generation_match=0,  # never overwrite another writer's blob
                            retry=self._retry,
                            timeout=self._timeout,
                        )
                    except gexc.PreconditionFailed:
                        written_final.pop()  # not ours: leave it alone
                        raise
        except BaseException:
            failed = self._gs_delete_names(loc, base_uri, written_final + written_tmp)
            if failed:
                logger.error(
                    "Publishing %s failed and %d blobs could not be removed: %s",
                    final.uri,
                    len(failed),
                    failed[:10],
                )
            raise
        leftover = self._gs_delete_names(loc, base_uri, written_tmp)
        if leftover:
            logger.warning(
                "Published %s but could not remove %d temporary blobs under %s",
                final.uri,
                len(leftover),
                tmp.uri,
            )
