"""Small bundled data sets: no download, no cloud account (the demo, tests, benchmarks)."""

from __future__ import annotations

import numpy as np


def digits_images(side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, side, side, 3) float32 in [0, 255], int64 labels.

    The 8x8 images are upscaled by repetition, so ``side`` must be a multiple of 8.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    rep = side // 8
    images = np.repeat(np.repeat(d.images / 16.0 * 255.0, rep, 1), rep, 2)
    return images[..., None].repeat(3, -1).astype("float32"), d.target.astype("int64")
