"""Model files naming classes that an installed package registers: keras-hub's.

For the ``--trust-package`` tests (pruner, CLI and service). The files carry no
code: they name ``keras_hub>ResNetBackbone`` and friends, which Keras finds in
its registry once keras_hub is imported. Built from the tiny ResNet of
``tests/pruner/hub_models.py`` (no preset is downloaded).
"""

from __future__ import annotations

from typing import Any

from tests.pruner import hub_models

#: The option an operator passes, and the package it names.
TRUSTED = ("keras_hub",)
CLASSES = 4


def backbone(path: str) -> str:
    """The bare ``keras_hub>ResNetBackbone`` (32x32x3 in, feature map out), saved at ``path``."""
    model, _ = hub_models.build("ResNetBackbone")
    model.save(path)
    return path


def classifier(path: str) -> Any:
    """A ``keras_hub>ResNetImageClassifier`` on that backbone (image in, logits out).

    A keras-hub task: the backbone nested in its config, a pooling head, and
    its preprocessor (more registered classes). Returns the model; saved at ``path``.
    """
    model, _ = hub_models.build("ResNetBackbone")
    task = hub_models.hub().models.ResNetImageClassifier(backbone=model, num_classes=CLASSES)
    task.save(path)
    return task
