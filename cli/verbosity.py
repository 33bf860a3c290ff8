"""What an in-process command shows: Secateur's own lines; the libraries' only with ``-v``.

TensorFlow, tf_keras and Keras talk while they start and while they save: C++
log lines (oneDNN, cpu_feature_guard, cuInit, absl's "before InitializeLog"),
Python warnings (tf_keras's "saving your model as an HDF5 file", which
reading a tf.keras SavedModel triggers) and the ``tensorflow`` logger. None
of it is the user's business unless they ask:

- quiet (the default): TF_CPP_MIN_LOG_LEVEL=3 before TensorFlow starts (the
  worker processes of ``secateur demo``'s in-process service inherit it),
  TensorFlow imported with stderr closed (the lines absl writes before its
  logging starts ignore that level), and warnings and every non-Secateur
  logger sent to a handler that drops them;
- ``-v``: all of it, library lines prefixed with their logger's name, and
  Secateur's INFO lines; ``-vv``: DEBUG too (a demo's worker output).

Setting TF_CPP_MIN_LOG_LEVEL yourself keeps TensorFlow's C++ lines at that level.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

OWN_LOGGER = "secateur"


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (as logging's last resort does)."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _own(record: logging.LogRecord) -> bool:
    return record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")


class _Format(logging.Formatter):
    """Secateur's lines as they are; a library's prefixed with its logger (``tensorflow: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if _own(record) else f"{record.name}: {text}"


def route_output(verbosity: int) -> None:
    """Send log records and warnings through one stderr handler, before TensorFlow starts.

    Quiet (``verbosity`` 0): Secateur's WARNING and above only. Once per
    process; later calls change the level and what passes.
    """
    if verbosity == 0:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        # With a handler on the root logger, TensorFlow's logger adds none of
        # its own and its records come here.
        handler = _Stderr()
        handler.setFormatter(_Format("%(message)s"))
        root.addHandler(handler)
    handler.filters = [] if verbosity else [_own]
    root.setLevel(
        logging.DEBUG if verbosity > 1 else logging.INFO if verbosity else logging.WARNING
    )


@contextmanager
def logging_restored() -> Iterator[None]:
    """The root logger and warnings' display back as they were afterwards.

    A command run by ``main()`` inside a longer process (a test, a notebook)
    leaves that process's logging as it found it.
    """
    root = logging.getLogger()
    handlers, level, showwarning = root.handlers[:], root.level, warnings.showwarning
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        if warnings.showwarning is not showwarning:
            logging.captureWarnings(False)
