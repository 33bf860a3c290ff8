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
    ├── DownloadTooLargeError      a download passed the server's size cap (streaming)
    └── InvalidUriError            unsupported scheme or malformed URI
                                   (also a ValueError)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DiskBudgetError",
    "DownloadTooLargeError",
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


class DownloadTooLargeError(StorageError):
    """A download passed the server's cap (``--max-model-bytes``), counted while streaming;
    the partial copy is removed."""


class ByteBudget:
    """Counts the bytes of one download against a cap; raises the moment it is passed."""

    def __init__(self, limit: int, uri: str) -> None:
        self.limit, self.uri, self.used = limit, uri, 0

    def add(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise DownloadTooLargeError(
                f"the model is over this server's download cap of {self.limit} bytes "
                "(--max-model-bytes); nothing was kept. Prune a smaller model or ask the "
                "operator to raise the cap.",
                self.uri,
            )


def copy_counted(read: Any, write: Any, budget: ByteBudget | None, chunk: int = 1 << 20) -> None:
    """Copy ``read(n)`` into ``write(bytes)`` in chunks, counting them against ``budget``."""
    while True:
        data = read(chunk)
        if not data:
            return
        if budget is not None:
            budget.add(len(data))
        write(data)
