"""Where the user's URIs meet the local work: checks before any work, and errors
that name what the user sent.

:func:`preflight` is the one check both the service (at CreateJob, before a
job is queued) and ``secateur prune`` (before anything is downloaded) run, so
a request the service refuses is refused by the CLI alike.

:func:`user_paths` renames, in an error on its way out, the local copies a job
works on (``<state-dir>/work/plan-…/vgg.keras``,
``/tmp/secateur-job-…/train/0/…``) back to the URIs they were fetched from: a
client never sees a server-internal path, and can act on the message.

This module never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from secateur.pruner.errors import InvalidSpecError
from secateur.server.errors import echo
from secateur.server.storage import Location, Storage, StorageExistsError, StorageNotFoundError

if TYPE_CHECKING:
    from secateur.server.pipeline.job_request import JobRequest

#: Prefix of every temporary directory a job, a plan or a model conversion makes.
TEMP_PREFIX = "secateur-"


@dataclass(frozen=True)
class JobPlaces:
    """Where one job reads and writes: its URIs parsed and allow-listed once.

    Attributes:
        model: the model to prune.
        output: the ``<base>`` its version is published under.
        train_data / eval_data: the files the data patterns matched, in order.
    """

    model: Location
    output: Location
    train_data: tuple[Location, ...] = ()
    eval_data: tuple[Location, ...] = ()


def preflight(storage: Storage, req: JobRequest) -> JobPlaces:
    """Fail before any heavy work when the input or the output cannot be used.

    Returns:
        The job's places, for the job to fetch from and publish to without
        parsing or globbing its URIs again.

    Raises:
        StoragePermissionError / InvalidUriError: a URI outside the allow-list
            or malformed; ``.field`` names the request field that held it.
        StorageNotFoundError: no model, or a data pattern matching nothing.
        InvalidSpecError: ``output_uri`` is the model or lies inside it (field
            ``output_uri``): publishing there would write into the input.
        StorageExistsError: the requested output version exists.
    """
    output = storage.locate(req.output_uri, "output_uri")
    existing = storage.list_versions(output)  # reachability
    model = storage.locate(req.model_uri, "model_uri")
    if not storage.exists(model):
        raise StorageNotFoundError("the model must exist.", model.text)
    if output.within(model):
        raise InvalidSpecError(
            "output_uri must not be the model or lie inside it: publishing there would "
            "write into the input model. Received: "
            f"output_uri={echo(req.output_uri)} within model_uri={echo(req.model_uri)}",
            "output_uri",
        )
    train = _matches(storage, req.train_data, "train_data")
    evals = _matches(storage, req.eval_data, "eval_data")
    if req.version is not None and req.version in existing:
        raise StorageExistsError(
            f"output version {req.version} already exists; versions are never overwritten.",
            output.text,
        )
    return JobPlaces(model, output, train, evals)


def _matches(storage: Storage, pattern: str | None, field: str) -> tuple[Location, ...]:
    """The files ``pattern`` matches (NOT_FOUND when none); () without a pattern."""
    return tuple(storage.find(storage.locate(pattern, field))) if pattern else ()


@contextlib.contextmanager
def user_paths(names: Mapping[str, str], fallback: str = "a temporary copy") -> Iterator[None]:
    """Rename local copies back to their URIs in any error raised inside.

    Args:
        names: local path -> the URI it was fetched from; read when an error
            passes, so a caller may keep adding to it inside the block.
        fallback: what to call any other path under a ``secateur-`` temporary
            directory (e.g. the model URI around model loading, whose
            conversions go through temporary files).
    """
    try:
        yield
    except Exception as exc:
        rename_paths(exc, names, fallback)
        raise


def rename_paths(exc: BaseException, names: Mapping[str, str], fallback: str) -> None:
    """Rewrite ``exc``'s message (and a storage error's ``.uri``) in place; same type."""
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (renamed(exc.args[0], names, fallback), *exc.args[1:])
    uri = getattr(exc, "uri", None)
    if isinstance(uri, str):
        with contextlib.suppress(AttributeError):
            exc.uri = renamed(uri, names, fallback)  # type: ignore[attr-defined]


def renamed(text: str, names: Mapping[str, str], fallback: str) -> str:
    """``text`` with each local path in ``names`` (longest first) replaced by its URI."""
    for local in sorted(names, key=len, reverse=True):
        text = text.replace(local, names[local])
    temp = re.escape(tempfile.gettempdir().rstrip("/")) + "/" + re.escape(TEMP_PREFIX)
    return re.sub(temp + r"[^\s'\"]*", lambda _m: fallback, text)
