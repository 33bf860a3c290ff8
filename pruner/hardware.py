"""Accelerator layout: the channel multiple each device prefers, and padding.

XLA on TPU lays tensors out in 8x128 tiles (the minor dimension padded to
128 lanes, the second-minor to 8 sublanes): a layer of 100 channels costs
what one of 128 does. GPUs' tensor cores want channel counts in multiples of
8. On CPU, oneDNN's blocked formats work in 16-float vectors (AVX-512).
Measured here (VGG-16-BN, CIFAR shape, batch 128, ``benchmarks/measure.py``):
with ``--round-to 1`` the step-time ratio runs 1.04-1.5x the FLOPs ratio,
with ``--round-to 16`` 0.95-0.97x (1.15x at 70%), so 16 is the CPU default.
``round_to="auto"`` picks the device's multiple so pruning removes channels
the hardware would otherwise pad back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# (second-minor, minor) padding multiples of a weight's last two dimensions.
TILES: dict[str, tuple[int, int]] = {"TPU": (8, 128), "GPU": (8, 8), "CPU": (1, 16)}
AUTO_ROUND_TO: dict[str, int] = {"TPU": 128, "GPU": 8, "CPU": 16}


def detect_device_kind() -> str:
    """``TPU``, ``GPU`` or ``CPU``: what TensorFlow sees attached."""
    import tensorflow as tf

    if tf.config.list_logical_devices("TPU"):
        return "TPU"
    if tf.config.list_physical_devices("GPU"):
        return "GPU"
    return "CPU"


def resolve_round_to(round_to: int | str, device_kind: str | None = None) -> int:
    """An integer multiple for ``round_to`` (``"auto"`` = the device's)."""
    if round_to != "auto":
        return int(round_to)
    return AUTO_ROUND_TO[device_kind or detect_device_kind()]


def padded_size(shape: Sequence[int], tile: tuple[int, int]) -> int:
    """Elements a weight of ``shape`` occupies once its last two dims are padded."""
    dims = [int(d) for d in shape]
    if not dims:
        return 1
    second, minor = tile
    dims[-1] = math.ceil(dims[-1] / minor) * minor
    if len(dims) >= 2:
        dims[-2] = math.ceil(dims[-2] / second) * second
    return math.prod(dims)


def layer_params(model: Any, device_kind: str) -> list[dict[str, Any]]:
    """Logical and padded parameter counts of every weighted layer.

    Nested models are walked; shared weights count once.
    """
    tile = TILES[device_kind]
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()

    def walk(m: Any, prefix: str) -> None:
        for layer in m.layers:
            if hasattr(layer, "layers") and hasattr(layer, "inputs"):
                walk(layer, prefix + layer.name + "/")
                continue
            weights = [w for w in layer.weights if id(w) not in seen]
            if not weights:
                continue
            seen.update(id(w) for w in weights)
            logical = sum(math.prod(int(d) for d in w.shape) for w in weights)
            padded = sum(padded_size(w.shape, tile) for w in weights)
            rows.append({"layer": prefix + layer.name, "params": logical, "padded_params": padded})

    walk(model, "")
    return rows
