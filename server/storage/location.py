"""Where data lives: a URI parsed once into a :class:`Location`, and the allow-list.

Three spellings are understood:

* a local path, absolute or relative (``/models/vgg``, ``runs/out``);
* ``file:///models/vgg`` (``file://localhost/...`` too), the same as the path;
* ``gs://bucket/some/prefix``.

Anything else (``s3://``, ``http://``, an empty string, ``gs://`` without a
bucket, ...) raises :class:`InvalidUriError`. Local spellings are resolved with
:func:`os.path.realpath`, so ``..`` and symlinks cannot escape an allow-list;
``gs://`` keys lose their surrounding slashes and may hold no ``.``/``..``
segment. The user's own spelling travels along as :attr:`Location.text`, so
errors name what the user sent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from secateur.server.storage.errors import InvalidUriError, StoragePermissionError

__all__ = ["AllowList", "Location", "has_wildcard", "is_under"]

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
#: Characters that make a path segment a glob pattern.
WILDCARDS = "*?["


def is_under(path: str, prefix: str) -> bool:
    """True when ``path`` equals ``prefix`` or lies under it on a '/' boundary."""
    if path == prefix:
        return True
    return path.startswith(prefix.rstrip("/") + "/")


def has_wildcard(text: str) -> bool:
    return any(c in text for c in WILDCARDS)


@dataclass(frozen=True)
class Location:
    """A parsed, normalised place in storage: a local real path or a GCS bucket + key.

    Build one with :meth:`parse`; two spellings of one place compare equal
    (``text`` does not take part in comparison).

    Attributes:
        scheme: ``"file"`` (a local path) or ``"gs"``.
        path: local: the absolute real path; gs: the object key or prefix,
            without leading or trailing ``/`` (``""`` for the whole bucket).
        bucket: the GCS bucket (``""`` locally).
        text: the URI as the user wrote it; defaults to :attr:`uri`.
    """

    scheme: str
    path: str
    bucket: str = ""
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.text:
            object.__setattr__(self, "text", self.uri)

    @classmethod
    def parse(cls, uri: str | Location) -> Location:
        """Parse a local path, ``file://`` or ``gs://`` URI (a Location passes through).

        Raises:
            InvalidUriError: malformed, empty, or an unsupported scheme.
        """
        if isinstance(uri, Location):
            return uri
        scheme = _scheme(uri)
        if scheme == "gs":
            return _parse_gs(uri)
        if scheme in ("", "file"):
            return cls("file", os.path.realpath(_local_path(uri, scheme)), text=uri)
        raise InvalidUriError(
            f"Unsupported URI scheme '{scheme}://'; use a local path, file:// or gs://.", uri
        )

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def uri(self) -> str:
        """The normalised form: the real local path, or ``gs://bucket[/key]``."""
        if self.is_local:
            return self.path
        return f"gs://{self.bucket}/{self.path}" if self.path else f"gs://{self.bucket}"

    @property
    def tf_path(self) -> str:
        """The path ``tf.io.gfile`` and ``tf.data`` open (they read ``gs://`` natively)."""
        return self.uri

    @property
    def name(self) -> str:
        """The last path segment (the bucket for a bucket root, ``/`` for the root)."""
        if self.is_local:
            return os.path.basename(self.path.rstrip(os.sep)) or os.sep
        return self.path.rsplit("/", 1)[-1] if self.path else self.bucket

    @property
    def parent(self) -> Location:
        """The enclosing directory or prefix (a root is its own parent)."""
        if self.is_local:
            return Location("file", os.path.dirname(self.path))
        return Location("gs", self.path.rpartition("/")[0], self.bucket)

    def child(self, name: str) -> Location:
        """``name`` (one or more '/'-separated segments) inside this location."""
        if self.is_local:
            return Location("file", os.path.join(self.path, name))
        key = f"{self.path}/{name}" if self.path else name
        return Location("gs", key, self.bucket)

    def within(self, other: Location) -> bool:
        """True when this is ``other`` or lies under it; never across schemes or buckets."""
        return self.scheme == other.scheme and is_under(self.uri, other.uri)

    @property
    def given_path(self) -> str:
        """A local location as the user spelled it: absolute, symlinks not resolved.

        A glob pattern matches against this, so matches keep the user's spelling.
        """
        scheme = _scheme(self.text)
        if not self.is_local or scheme not in ("", "file"):
            return self.path
        return os.path.abspath(_local_path(self.text, scheme))

    @property
    def given_as_file_uri(self) -> bool:
        """True when the user wrote this local location as a ``file://`` URI."""
        return self.is_local and self.text.lower().startswith("file://")

    def __str__(self) -> str:
        return self.uri


def _scheme(uri: str) -> str:
    """The lower-cased scheme ("" for a plain path); refuses non-strings and empties."""
    if not isinstance(uri, str):
        raise InvalidUriError(
            f"A storage URI must be a string, not {type(uri).__name__}.", repr(uri)
        )
    if not uri or not uri.strip():
        raise InvalidUriError("A storage URI must not be empty.", repr(uri))
    if "\x00" in uri:
        raise InvalidUriError("A storage URI must not contain NUL characters.", repr(uri))
    match = _SCHEME_RE.match(uri)
    return "" if match is None else match.group(1).lower()


def _parse_gs(uri: str) -> Location:
    bucket, _, key = uri[len("gs://") :].partition("/")
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
    return Location("gs", key, bucket, text=uri)


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


class AllowList:
    """The prefixes every storage operation must stay within (``None``: anywhere).

    A location is allowed when, normalised, it equals a prefix or lies under
    one on a path-component boundary (``/data`` allows ``/data/x``, not
    ``/database``).
    """

    def __init__(self, prefixes: Sequence[str] | None) -> None:
        if isinstance(prefixes, str):
            raise TypeError(
                "allowed_prefixes must be a sequence of URIs, not a single string. "
                f"Received: {prefixes!r}"
            )
        self.locations: tuple[Location, ...] | None = (
            None if prefixes is None else tuple(Location.parse(p) for p in prefixes)
        )

    @property
    def prefixes(self) -> tuple[str, ...] | None:
        """The normalised prefixes, or ``None`` when everything is allowed."""
        return None if self.locations is None else tuple(p.uri for p in self.locations)

    def permits(self, loc: Location) -> bool:
        if self.locations is None:
            return True
        return any(loc.within(prefix) for prefix in self.locations)

    def permits_path(self, path: str) -> bool:
        """Whether a local file reached inside an allowed tree (maybe by a symlink) may be read."""
        return self.permits(Location("file", os.path.realpath(path)))

    def check(self, loc: Location) -> Location:
        """Return ``loc`` when allowed; raise :class:`StoragePermissionError` otherwise."""
        if not self.permits(loc):
            raise StoragePermissionError(
                f"The URI must lie within the allowed prefixes {list(self.prefixes or ())} "
                f"(normalised to '{loc.uri}').",
                loc.text,
            )
        return loc
