"""Storage by URI: local paths, ``file://`` URIs and ``gs://`` (Google Cloud Storage).

Layout (one concept per module)::

    location.py  Location: a URI parsed once (scheme, bucket, path/key, .uri,
                 .child(), .parent, .within(), .tf_path); AllowList
    backend.py   the Backend protocol every scheme implements, and the
                 publish hand-over (Staging)
    local.py     LocalBackend: plain paths and file:// (publish = one rename)
    gcs.py       GcsBackend: google-cloud-storage (publish = copy, saved_model.pb last)
    localfs.py   local-disk helpers both use (write-then-rename, error mapping)
    facade.py    Storage: parses and allow-lists once, dispatches by scheme,
                 owns the publish rule
    errors.py    the typed errors below

Parse at the boundary, pass :class:`Location` on: ``Storage.locate(uri)``
parses a user's URI and checks the allow-list; every :class:`Storage` method
takes a string or a Location, and ``Storage.find(pattern)`` returns the
matches as Locations. A Location keeps the user's spelling in ``.text`` so
errors name what the user sent.

Allow-list: ``Storage(allowed_prefixes=[...])`` restricts every public method to
URIs that, once normalised, equal a prefix or lie under it on a path-component
boundary (``/data`` allows ``/data/x``, not ``/database``). Local paths and
``file://`` URIs are normalised with :func:`os.path.realpath`, so ``..`` and
symlinks cannot escape; files reached through a symlink inside a copied tree
are checked one by one. ``gs://`` URIs are kept as ``gs://bucket/key``.

Publishing follows the TF Serving layout ``<base>/<version>/``: a version is
assembled under a temporary sibling (``<base>/.tmp-<uuid>``), checked free
again, and only then made visible -- by one ``os.rename`` locally, and on GCS
by copying the blobs with ``saved_model.pb`` last (TF Serving treats a version
as ready once that file is there). A version is never overwritten; a failure
removes whatever was written.

Streaming instead of downloading: a local ``location.tf_path`` is the real
path ``tf.data.TFRecordDataset`` opens directly; a ``gs://`` object is read by
``Storage.read_records(uri)``, which streams it in ranged chunks through
google-cloud-storage (allow-listed, ``STORAGE_EMULATOR_HOST`` honoured, which
TensorFlow's own GCS filesystem does not) and yields each record, checksums
checked (``tfrecord.py``). Neither makes a local copy.

Errors: the typed tree in :mod:`secateur.server.storage.errors` (each carries the
offending URI as ``.uri``; messages end with ``Received: <uri>``).

This package never imports TensorFlow.
"""

from __future__ import annotations

from secateur.server.storage.backend import SAVED_MODEL_FILE, TMP_PREFIX, Backend
from secateur.server.storage.errors import (
    DiskBudgetError,
    DownloadTooLargeError,
    InvalidUriError,
    StorageError,
    StorageExistsError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageUnreachableError,
)
from secateur.server.storage.facade import Storage, UriLike
from secateur.server.storage.location import AllowList, Location

__all__ = [
    "SAVED_MODEL_FILE",
    "TMP_PREFIX",
    "AllowList",
    "Backend",
    "DiskBudgetError",
    "DownloadTooLargeError",
    "InvalidUriError",
    "Location",
    "Storage",
    "StorageError",
    "StorageExistsError",
    "StorageNotFoundError",
    "StoragePermissionError",
    "StorageUnreachableError",
    "UriLike",
]
