"""Reference architectures of the study, built with the functional API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from secateur.pruner._keras import keras

# VGG-16 layer widths; "M" is a 2x2 max-pool.
VGG16_WIDTHS: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
    512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def vgg16_bn(
    input_shape: Sequence[int] = (32, 32, 3),
    classes: int = 10,
    width: float = 1.0,
    widths: Sequence[int | str] = VGG16_WIDTHS,
    dense: int = 512,
    dropout: float = 0.5,
    bn_momentum: float = 0.9,
    name: str = "vgg16_bn",
) -> Any:
    """VGG-16 with BatchNormalization, as the study trains on CIFAR-10.

    Every 3x3 convolution is followed by BatchNorm and ReLU; the classifier is
    Flatten -> Dense(dense) -> BatchNorm -> ReLU -> Dropout -> Dense(classes)
    returning logits. The input is expected in [0, 255] and rescaled inside.

    Args:
        input_shape: (height, width, channels); sides must be divisible by
            2**(number of pools) for ImageNet-style shapes to flatten cleanly.
        classes: number of output logits.
        width: multiplier applied to every conv width (for small demos).
        widths: conv widths, "M" for max-pooling.
        dense: width of the hidden classifier layer.
        dropout: dropout rate before the last layer.
        bn_momentum: BatchNorm moving-average momentum. 0.9 (PyTorch's
            default, which the study's CIFAR VGG uses) rather than Keras's
            0.99, so short fine-tunes leave usable inference statistics.
        name: model name.

    Returns:
        An uncompiled functional ``keras.Model``.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    block, conv = 1, 1
    for w in widths:
        if w == "M":
            x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
            block, conv = block + 1, 1
            continue
        filters = max(1, int(round(int(w) * width)))
        prefix = f"block{block}_conv{conv}"
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=prefix)(x)
        x = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{prefix}_bn")(x)
        x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
        conv += 1
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(max(1, int(round(dense * width))), use_bias=False, name="fc1")(x)
    x = keras.layers.BatchNormalization(momentum=bn_momentum, name="fc1_bn")(x)
    x = keras.layers.ReLU(name="fc1_relu")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)
