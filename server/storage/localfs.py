"""Local-disk helpers both backends use: error mapping and write-then-rename.

Every download, from any backend, lands on local disk through
:func:`replace_file` or :func:`fill_tree`, so a failure never leaves a
partial copy where the caller looks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from secateur.server.storage.backend import TMP_PREFIX
from secateur.server.storage.errors import (
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
)


@contextlib.contextmanager
def os_errors(uri: str) -> Iterator[None]:
    """Map OS exceptions to :class:`StorageError` subclasses naming ``uri``."""
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


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def replace_file(target: str, fill: Callable[[str], Any]) -> None:
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


def fill_tree(target: str, uri: str, fill: Callable[[str], None]) -> None:
    """Build a directory in a temporary sibling, then put it at ``target``."""
    tmp = os.path.join(os.path.dirname(target), f"{TMP_PREFIX}{uuid.uuid4().hex}")
    try:
        with os_errors(uri):
            os.makedirs(tmp)
            fill(tmp)
            if os.path.lexists(target):
                remove(target)
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove(path: str) -> None:
    """Remove a file, a link or a whole tree."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def tree_files(local_dir: str) -> list[str]:
    """Relative POSIX paths of every file under ``local_dir`` (symlinks followed)."""
    files: list[str] = []
    for root, _dirs, names in os.walk(local_dir, followlinks=True):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            files.append(rel.replace(os.sep, "/"))
    return files
