"""A job's data: training and evaluation sets built once, every record checked.

Fine-tuning and data-driven scoring take their passes from
:meth:`JobData.epoch`, whose order depends only on the job's seed and the
pass's place (candidate, round, epoch), so an attempt that resumes from a
checkpoint (``checkpoint.py``) sees the data exactly as the first attempt did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from secateur.pruner.errors import DataError
from secateur.server.storage import Location

if TYPE_CHECKING:
    from secateur.pruner.epoch_data import EpochData
    from secateur.server.pipeline.job_request import JobRequest


def pass_seed(seed: int, *where: int) -> int:
    """A seed for the pass at ``where`` (candidate, round, epoch) of a job seeded ``seed``."""
    digest = hashlib.sha256(repr((seed, *where)).encode()).digest()
    return int.from_bytes(digest[:7], "big")  # fits tf.data's int64 and NumPy's seeding


class JobData:
    """Training/eval datasets, built once and checked against the model."""

    def __init__(
        self,
        model: Any,
        train: list[str],
        evalf: list[str],
        req: JobRequest,
        device: Any,
        names: dict[str, str],
        should_cancel: Callable[[], bool],
        stream: Callable[[str], Any] | None = None,
    ) -> None:
        self.shape = shape = tuple(model.inputs[0].shape[1:])
        self.classes = int(model.outputs[0].shape[-1])
        self.batch_size = req.train.batch_size
        if (train or evalf) and (len(model.inputs) != 1 or len(shape) != 3):
            raise DataError(
                "training data is image classification (one (H, W, C) input). "
                f"Received: a model with inputs {[tuple(t.shape) for t in model.inputs]}"
            )
        self.should_cancel = should_cancel
        #: Reads a ``gs://`` file's records (the job's Storage.read_records):
        #: TensorFlow's GCS filesystem ignores STORAGE_EMULATOR_HOST and the
        #: allow-list; local files are opened by TensorFlow itself.
        self.stream = stream
        self.seed = req.spec.seed
        #: Training passes whose order comes from a seed alone (fine-tuning, scoring).
        self.epochs: EpochData | None = None
        self.train_ds = self._build(train, names, req, True, "train_data")
        self.eval_ds = self._build(evalf, names, req, False, "eval_data")

    def epoch(self, *where: int) -> Any:
        """One training pass whose order depends only on the job's seed and ``where``
        (candidate, round, epoch): the same in a resumed attempt as in the first."""
        assert self.epochs is not None
        return self.epochs.epoch(pass_seed(self.seed, *where))

    def _build(
        self, files: list[str], names: dict[str, str], req: JobRequest, train: bool, field: str
    ) -> Any:
        """Every record checked here, before any training; errors name the user's URIs."""
        from secateur.pruner.data import make_dataset
        from secateur.pruner.epoch_data import make_training_data

        if not files:
            return None
        stream = None if all(Location.parse(f).is_local for f in files) else self.stream
        shown = [names.get(f, f) for f in files]
        try:
            if train:
                ds, self.epochs = make_training_data(
                    files, self.shape, self.batch_size, req.data, req.spec.seed,
                    self.classes, shown, self.should_cancel, stream,
                )  # fmt: skip
                return ds
            return make_dataset(
                files, self.shape, self.batch_size, req.data, False, req.spec.seed,
                self.classes, names=shown, should_cancel=self.should_cancel, read_records=stream,
            )  # fmt: skip
        except DataError as exc:
            exc.field = exc.field or field
            raise

    def batch(self) -> tuple[Any, Any]:
        """One full training batch for measurement (synthetic when no data)."""
        import numpy as np

        source = self.train_ds or self.eval_ds
        if source is not None:
            images, labels = next(iter(source.unbatch().repeat().batch(self.batch_size)))
            return np.asarray(images), np.asarray(labels)
        if any(d is None for d in self.shape):
            raise DataError(f"measuring needs a fixed input shape or data. Received: {self.shape}")
        rng = np.random.default_rng(0)
        images = rng.uniform(0, 255, (self.batch_size, *self.shape)).astype("float32")
        return images, rng.integers(0, self.classes, self.batch_size)
