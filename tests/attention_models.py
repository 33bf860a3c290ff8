"""A small image classifier with self-attention, for the CLI and service tests of
``head_ratio`` (the digits data are 32x32x3 images with 10 classes)."""

from __future__ import annotations

from typing import Any


def image_attention_model(heads: int = 4, name: str = "attn") -> Any:
    """Patchify conv -> tokens -> [LN -> MHA -> Add] -> GAP1D -> Dense(10)."""
    import keras

    L = keras.layers
    inp = keras.Input((32, 32, 3), name="image")
    x = L.Rescaling(1 / 255.0)(inp)
    x = L.Conv2D(16, 8, strides=8, name="patch")(x)
    x = L.Reshape((16, 16), name="tokens")(x)
    y = L.LayerNormalization(name="ln")(x)
    y = L.MultiHeadAttention(heads, 4, name="mha")(y, y)
    x = L.Add(name="residual")([x, y])
    x = L.Dense(24, activation="relu", name="fc")(x)
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inp, L.Dense(10, name="head")(x), name=name)
