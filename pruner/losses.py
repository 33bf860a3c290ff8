"""What a model's outputs are, for the losses that train it (no TensorFlow import).

Shared by fine-tuning, distillation and Taylor scoring, which must all know
whether the last layer already applies a softmax.
"""

from __future__ import annotations

from typing import Any

from secateur.pruner._keras import keras


def outputs_probabilities(model: Any) -> bool:
    """True when the model ends in a softmax (probabilities), False for logits."""
    layer = model.outputs[0]._keras_history[0]
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"
