"""Typed storage errors; every backend raises these and nothing else.

Each carries the user's spelling of the URI concerned as ``.uri``; messages
end with ``Received: <uri>``::

    StorageError(Exception)
    ├── StorageNotFoundError       nothing at the URI
    ├── StoragePermissionError     URI outside the allow-list, or access denied
    ├── StorageExistsError         the target version already exists
    ├── StorageUnreachableError    host or bucket cannot be reached, network error,
    │                              bucket missing when writing, no credentials
    └── InvalidUriError            unsupported scheme or malformed URI
                                   (also a ValueError)
"""

from __future__ import annotations

__all__ = [
    "InvalidUriError",
    "StorageError",
    "StorageExistsError",
    "StorageNotFoundError",
    "StoragePermissionError",
    "StorageUnreachableError",
]


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
