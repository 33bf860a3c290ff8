"""A job's checkpoints: finished candidates and fine-tuning state, kept until the job ends.

A worker on a preemptible node, or one KEDA scales down, stops its job in the
middle (``workers/loop.py`` hands it back to the queue). So that the next
attempt does not start from zero, a service job checkpoints at its natural
boundaries into its private work area on the job's own storage (local or
``gs://``, beside the versions but never one of them)::

    <output_uri>/.secateur-work/<job id>/manifest.json
                                         candidate-<i>.keras     a finished candidate
                                         tune-<i>-<j>-<e>.npz    fine-tuning after epoch e

- each finished candidate of a sweep: its pruned, fine-tuned model, plan,
  history and accuracy;
- fine-tuning at the end of an epoch, at most every
  ``SECATEUR_CHECKPOINT_SECONDS`` (default 300; 0: every epoch): every
  variable of the model (weights, BatchNorm statistics, Dropout's seed
  states), the optimizer's (iterations, momenta) and the history so far; the
  data position is the epoch (each epoch's order comes from its own seed,
  :mod:`secateur.pruner.epoch_data`).

Every file is written whole before ``manifest.json`` names it (a local write
is a rename, a GCS upload one object), so a worker killed at any moment
leaves the previous checkpoint intact. A manifest made for another spec (its
fingerprint) is ignored. The area goes when the job ends, whatever the
outcome, and before its end is written (whoever sees the end sees a clean
output): the job removes it once its version is published, or when it fails or
is cancelled, or finds its version already published by an earlier attempt;
the worker loop removes it for every end it writes (past its wall time, killed,
preempted too often, a job the store hands over only to end it: Claim.ending),
and so does the server for a job cancelled while queued or given up at a
restart. TF Serving ignores
the hidden directory, as it does the ``.tmp-`` staging of a publication.

This module never imports TensorFlow at import time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from secateur.server.holds import hold
from secateur.server.storage import Location, Storage, StorageNotFoundError

log = logging.getLogger("secateur.server")

#: The hidden directory under a job's output base that holds its work areas.
WORK_DIR = ".secateur-work"
#: Seconds between two fine-tuning checkpoints (taken at an epoch's end); 0: every epoch.
EVERY_ENV = "SECATEUR_CHECKPOINT_SECONDS"
DEFAULT_EVERY_S = 300.0
FORMAT = 1


def work_area(storage: Storage, output_uri: str, job_id: str) -> Location:
    """``<output_uri>/.secateur-work/<job_id>`` (allow-listed like the output)."""
    return storage.locate(output_uri, "output_uri").child(WORK_DIR).child(job_id)


def every_s(environ: dict[str, str] | None = None) -> float:
    """The fine-tuning checkpoint interval from :data:`EVERY_ENV`."""
    text = (os.environ if environ is None else environ).get(EVERY_ENV, "").strip()
    try:
        return max(0.0, float(text)) if text else DEFAULT_EVERY_S
    except ValueError:
        raise ValueError(f"{EVERY_ENV} must be a number of seconds. Received: {text!r}") from None


def remove_area(storage: Storage, area: Location) -> None:
    """Delete a work area, and the ``.secateur-work`` directory once it is empty (local)."""
    storage.delete(area, missing_ok=True)
    parent = area.parent
    if parent.is_local:
        try:
            os.rmdir(parent.path)
        except OSError:
            pass  # another job's area is still there, or it is gone already


def discard(spec: bytes, job_id: str, allowed: Sequence[str] | None) -> None:
    """Remove ``job_id``'s checkpoints (the worker loop, ending a job); errors only log."""
    from secateur.v1 import pruning_pb2 as pb

    try:
        storage = Storage(list(allowed) if allowed else None)
        remove_area(storage, work_area(storage, pb.JobSpec.FromString(spec).output_uri, job_id))
    except Exception as exc:  # noqa: BLE001 - a leftover area is removed by nobody else
        log.warning("job %s: removing its checkpoints failed (%s)", job_id, exc)


class Checkpoints:
    """One job's checkpoints in its work area (see module docstring).

    Args:
        storage: the job's storage (allow-listed).
        area: the work area (:func:`work_area`).
        fingerprint: identifies the spec; a manifest of another is ignored.
        attempt: this run's attempt number (for the report).
        trusted: packages whose classes a checkpointed model may name.
        interval_s: seconds between fine-tuning checkpoints (0: every epoch).
    """

    def __init__(
        self,
        storage: Storage,
        area: Location,
        fingerprint: str,
        attempt: int = 0,
        trusted: Sequence[str] = (),
        interval_s: float = DEFAULT_EVERY_S,
    ) -> None:
        self.storage, self.area, self.fingerprint = storage, area, fingerprint
        self.attempt, self.trusted, self.interval_s = attempt, tuple(trusted), interval_s
        self.manifest = self._load()
        self._last = time.monotonic()
        #: Fine-tuning epochs this attempt trained (the report's proof of skipped work).
        self.epochs_trained = 0

    @staticmethod
    def fingerprint_of(spec: bytes) -> str:
        return hashlib.sha256(spec).hexdigest()

    def _load(self) -> dict[str, Any]:
        fresh: dict[str, Any] = {"format": FORMAT, "fingerprint": self.fingerprint}
        fresh |= {"resumes": [], "candidates": {}, "tuning": None}
        try:
            found = json.loads(self.storage.read_bytes(self.area.child("manifest.json")))
        except (StorageNotFoundError, ValueError):
            return fresh
        ok = isinstance(found, dict) and found.get("format") == FORMAT
        return found if ok and found.get("fingerprint") == self.fingerprint else fresh

    def _write(self, name: str, data: bytes) -> None:
        self.storage.write_bytes(self.area.child(name), data)

    def _commit(self) -> None:
        self._write("manifest.json", json.dumps(self.manifest, indent=1).encode())

    # -- an attempt --------------------------------------------------------
    def begin(self) -> None:
        """Record a resume when earlier attempts left checkpoints (counted even if this
        attempt is stopped too)."""
        done = self.manifest["candidates"]
        tuning = self.manifest["tuning"]
        if not done and tuning is None:
            return
        entry: dict[str, Any] = {
            "attempt": self.attempt,
            "candidates_done": [done[k]["ratio"] for k in sorted(done, key=int)],
            "fine_tuning": None,
        }
        text = f"attempt {self.attempt}: candidates {entry['candidates_done']} done"
        if tuning is not None:
            keys = ("ratio", "candidate", "round", "epochs_done")
            entry["fine_tuning"] = {k: tuning[k] for k in keys}
            text += f"; ratio {tuning['ratio']} fine-tuning from epoch {tuning['epochs_done']}"
        entry["text"] = text
        self.manifest["resumes"].append(entry)
        self._commit()

    def report(self) -> dict[str, Any]:
        """The report's ``resumed``: how many times, from where, and what this attempt trained."""
        return {
            "times": len(self.manifest["resumes"]),
            "from": list(self.manifest["resumes"]),
            "epochs_trained": self.epochs_trained,
        }

    def remove(self) -> None:
        """Delete the work area (the job ended); a failure only logs, the job's outcome stands."""
        try:
            remove_area(self.storage, self.area)
        except Exception as exc:  # noqa: BLE001 - the worker loop tries again when it concludes
            log.warning("removing the checkpoints at %s failed (%s)", self.area.uri, exc)

    # -- finished candidates -----------------------------------------------
    def candidate(self, i: int) -> dict[str, Any] | None:
        """Candidate ``i`` as a finished attempt left it (``_model`` loaded), or None."""
        saved = self.manifest["candidates"].get(str(i))
        if saved is None:
            return None
        from secateur.pruner.modelio import load_model

        with tempfile.TemporaryDirectory(prefix="secateur-ckpt-") as tmp:
            path = os.path.join(tmp, "candidate.keras")
            with open(path, "wb") as fh:
                fh.write(self.storage.read_bytes(self.area.child(saved["file"])))
            model = load_model(path, self.trusted)
        return dict(saved["record"]) | {"_model": model}

    def save_candidate(self, i: int, out: dict[str, Any]) -> None:
        """Checkpoint finished candidate ``i`` (its model, plan, history, accuracy)."""
        name = f"candidate-{i}.keras"
        with tempfile.TemporaryDirectory(prefix="secateur-ckpt-") as tmp:
            path = os.path.join(tmp, "candidate.keras")
            out["_model"].save(path)
            with open(path, "rb") as fh:
                self._write(name, fh.read())
        record = {k: v for k, v in out.items() if not k.startswith("_")}
        self.manifest["candidates"][str(i)] = {
            "file": name,
            "ratio": out["ratio"],
            "record": record,
        }
        old, self.manifest["tuning"] = self.manifest["tuning"], None
        self._commit()
        if old is not None:
            self.storage.delete(self.area.child(old["file"]), missing_ok=True)

    # -- fine-tuning -------------------------------------------------------
    def tuning(self, i: int, j: int) -> Any:
        """The TrainState to resume candidate ``i``'s round ``j`` from, or None."""
        saved = self.manifest["tuning"]
        if saved is None or (saved["candidate"], saved["round"]) != (i, j):
            return None
        import numpy as np

        from secateur.pruner.epoch_data import TrainState

        with np.load(io.BytesIO(self.storage.read_bytes(self.area.child(saved["file"])))) as npz:
            n_vars, n_opt = saved["variables"], saved["optimizer"]
            variables = [npz[f"v{k}"] for k in range(n_vars)]
            optimizer = [npz[f"o{k}"] for k in range(n_opt)]
        return TrainState(saved["epochs_done"], variables, optimizer, saved["history"])

    def on_epoch(self, ratio: float, i: int, j: int) -> Callable[[int, Callable[[], Any]], None]:
        """Fine-tuning's ``ByEpoch.on_epoch`` for candidate ``i``, round ``j``."""

        def after(epochs_done: int, snapshot: Callable[[], Any]) -> None:
            self.epochs_trained += 1
            if time.monotonic() - self._last >= self.interval_s:
                self._save_tuning(ratio, i, j, snapshot())
                self._last = time.monotonic()
                hold(tuned_point(i, epochs_done))

        return after

    def _save_tuning(self, ratio: float, i: int, j: int, state: Any) -> None:
        import numpy as np

        buf = io.BytesIO()
        arrays = {f"v{k}": a for k, a in enumerate(state.variables)}
        np.savez(buf, **arrays, **{f"o{k}": a for k, a in enumerate(state.optimizer)})
        name = f"tune-{i}-{j}-{state.epochs_done}.npz"
        self._write(name, buf.getvalue())
        old = self.manifest["tuning"]
        self.manifest["tuning"] = {
            "file": name, "ratio": ratio, "candidate": i, "round": j,
            "epochs_done": state.epochs_done, "history": state.history,
            "variables": len(state.variables), "optimizer": len(state.optimizer),
        }  # fmt: skip
        self._commit()
        if old is not None and old["file"] != name:
            self.storage.delete(self.area.child(old["file"]), missing_ok=True)


def tuned_point(candidate: int, epochs_done: int) -> str:
    """The test hold point (``server/holds.py``) right after this fine-tuning checkpoint."""
    return f"tuned-{candidate}-{epochs_done}"
