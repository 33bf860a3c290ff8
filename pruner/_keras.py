"""The one place the pruner imports Keras (Keras 3, TensorFlow backend)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras

__all__ = ["keras"]
