"""Reproducible by default: one seed for every generator a job touches.

A job's seed (``PruneSpec.seed``) fixes the fresh initialisation, the data
shuffle and the ``random`` criterion; :func:`reproducible` also seeds the
generators nobody passes it to: Python's ``random`` (Keras draws every
unseeded layer's seed from it, Dropout's included, when a model is loaded or
rebuilt), NumPy's global state, TensorFlow's global seed (``tf.random`` and
``tf.data`` ops without their own seed) and Keras's global ``SeedGenerator``.
With op determinism on (the default), TensorFlow also picks deterministic
kernels and runs ``tf.data`` in order, so the same job on the same machine
gives the same plan, accuracy and weights; ``deterministic=False`` trades
that for speed. Scoring ties are broken by channel index (a stable sort).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from secateur.pruner._keras import keras

# np.random.seed takes 32 bits; Python's and TensorFlow's seeds take the whole int64.
_NUMPY_SEEDS = 2**32


@dataclass(frozen=True)
class Reproducibility:
    """What the report says about how a job was made repeatable."""

    seed: int
    deterministic: bool
    how: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras's global generator from ``seed``."""
    import tensorflow as tf

    keras.utils.set_random_seed(seed % _NUMPY_SEEDS)  # also resets Keras's global generator
    random.seed(seed)
    tf.random.set_seed(seed)


def describe(seed: int, deterministic: bool) -> Reproducibility:
    if deterministic:
        how = (
            f"seed {seed} for every generator; op determinism on "
            "(tf.config.experimental.enable_op_determinism): the same job on the same "
            "machine gives the same plan, accuracy and weights"
        )
    else:
        how = (
            f"seed {seed} for every generator; op determinism off (deterministic: false, "
            "for speed): kernels and tf.data may reorder floating-point sums, so repeated "
            "runs can differ slightly"
        )
    return Reproducibility(seed, deterministic, how)


@contextmanager
def reproducible(seed: int, deterministic: bool = True) -> Iterator[Reproducibility]:
    """Seed everything and set op determinism for the block; restore determinism after.

    Enter it at the start of a job, before the model is loaded: loading draws
    the seeds of the model's Dropout layers. Op determinism is process-wide;
    the previous setting comes back on exit so a library caller's own code
    runs as it did.
    """
    from tensorflow.python.framework import config as tf_config

    before = tf_config.is_op_determinism_enabled()
    seed_everything(seed)
    _set_op_determinism(deterministic)
    try:
        yield describe(seed, deterministic)
    finally:
        _set_op_determinism(before)


def _set_op_determinism(enabled: bool) -> None:
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    if enabled:
        tf.config.experimental.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()  # no public API to turn it off
