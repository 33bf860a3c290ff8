"""Typed storage errors; every backend raises these and nothing else.

Each carries the user's spelling of the URI concerned as ``.uri`` (and, where
the caller said so, the request field that held it as ``.field``); messages
end with ``Received: <uri>``, escaped when it holds control characters::

    StorageError(Exception)
    ├── StorageNotFoundError       nothing at the URI
    ├── StoragePermissionError     URI outside the allow-list, or access denied
    ├── StorageExistsError         the target version already exists
    ├── StorageUnreachableError    host or bucket cannot be reached, network error,
    │                              bucket missing when writing, no credentials
    ├── DiskBudgetError            a job's local files exceed its local disk budget
    └── InvalidUriError            unsupported scheme or malformed URI
                                   (also a ValueError)
"""

from __future__ import annotations

__all__ = [
    "DiskBudgetError",
    "InvalidUriError",
    "StorageError",
    "StorageExistsError",
    "StorageNotFoundError",
    "StoragePermissionError",
    "StorageUnreachableError",
]


class StorageError(Exception):
    """Base of every storage error.

    Attributes:
        uri: the URI concerned, as the user wrote it.
        field: the request field that held it (``model_uri``, ``train_data``),
            when the caller said so (see ``Storage.locate``); a BadRequest
            violation names it. ``""`` otherwise.
    """

    def __init__(self, message: str, uri: str, *, field: str = "") -> None:
        self.uri = uri
        self.field = field
        # ``message`` states the constraint; the URI is added here, once, even
        # when a caller already ended the message with it.
        constraint = message.rstrip().removesuffix(f"Received: {uri}").rstrip()
        super().__init__(f"{constraint} Received: {shown(uri)}")


def shown(uri: str) -> str:
    """``uri`` as a message shows it: as is, or escaped (``repr``) when it holds
    control or other unprintable characters a terminal or log would act on."""
    return uri if uri.isprintable() else repr(uri)


class StorageNotFoundError(StorageError):
    """Nothing exists at the URI."""


class StoragePermissionError(StorageError):
    """The URI lies outside the allow-list, or the backend denied access."""


class StorageExistsError(StorageError):
    """The target (a model version) already exists; nothing was written."""


class StorageUnreachableError(StorageError):
    """The host or bucket cannot be reached (network error, missing bucket, no credentials)."""


class DiskBudgetError(StorageError):
    """A job's local files (model copy, export) exceed the worker's local disk budget."""


class InvalidUriError(StorageError, ValueError):
    """The URI is malformed or uses an unsupported scheme."""
