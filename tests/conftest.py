"""Fixtures shared across packages: real data that needs no download.

scikit-learn ships the 8x8 digits data set; upscaled to 32x32x3 it is real
image classification data for fine-tuning and accuracy tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Peak-memory figures need the BFC CPU allocator, chosen when TF starts.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


def digits(side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, side, side, 3) floats in [0, 255] and labels."""
    from secateur.pruner.datasets import digits_images

    return digits_images(side)


@dataclass(frozen=True)
class DigitsData:
    root: Path
    train_glob: str
    eval_file: str
    model_path: str
    eval_accuracy: float


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> DigitsData:
    """Digits TFRecords (two train shards, one eval) and a small trained VGG-BN."""
    import keras

    from secateur.pruner.data import write_examples
    from secateur.pruner.models import vgg16_bn

    root = tmp_path_factory.mktemp("digits")
    images, labels = digits()
    write_examples(str(root / "train-0.tfrecord"), images[:700], labels[:700])
    write_examples(str(root / "train-1.tfrecord"), images[700:1400], labels[700:1400], "jpeg")
    write_examples(str(root / "eval.tfrecord"), images[1400:], labels[1400:])
    keras.utils.set_random_seed(0)
    model = vgg16_bn((32, 32, 3), 10, width=0.125, dense=64, name="digits_vgg")
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(images[:1400], labels[:1400], epochs=4, batch_size=64, verbose=0)
    _, acc = model.evaluate(images[1400:], labels[1400:], verbose=0)
    path = str(root / "vgg.keras")
    model.save(path)
    return DigitsData(
        root, str(root / "train-*.tfrecord"), str(root / "eval.tfrecord"), path, float(acc)
    )


# The slowest directories first: `make test` runs two pytest-xdist processes
# handing out whole files in collection order, so when the server and CLI
# files (a job each test: seconds to a minute) go first, the many sub-second
# pruner files fill the end and neither process sits idle waiting for the
# other's last long file. The sort is stable: files and tests keep their order
# within a directory.
_FIRST = {"server": 0, "cli": 1, "deploy": 2}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: _FIRST.get(item.path.parent.name, len(_FIRST)))
