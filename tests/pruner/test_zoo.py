"""Breadth: every keras.applications model prunes, runs, keeps its output shape and shrinks.

The light models run by default; heavy ones are marked ``slow`` (``-m slow``).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from secateur.pruner import PruneSpec, apply_plan, make_plan, prune

from .conftest import assert_same_outputs, kill_pruned_channels, randomize

ALL_APPLICATIONS = sorted(n for n in dir(keras.applications) if n[0].isupper())

# Measured build+prune time on the 2-core CI machine decides the split. By
# default: VGG16, MobileNet, ConvNeXtTiny (the exact test below does not build
# them), ResNet50 and MobileNetV3Small (both criteria and the plan's params
# accounting on residual and squeeze-and-excitation blocks) and Xception (cheap).
# DenseNet121, MobileNetV2 and EfficientNetB0 are still built, pruned at 30% and
# run by default in test_application_deadChannelsRemoved_sameOutputs. NASNetMobile
# (~55 s on the loaded machine), InceptionV3, EfficientNetV2B0, ResNet50V2
# (~20 s each) and the rest run with -m slow.
LIGHT = {
    "MobileNet",
    "MobileNetV3Small",
    "ResNet50",
    "VGG16",
    "Xception",
    "ConvNeXtTiny",
}
MIN_SIDE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}


def test_zoo_coversAllFortyApplications() -> None:
    assert len(ALL_APPLICATIONS) == 40


@pytest.mark.parametrize(
    "name",
    [n if n in LIGHT else pytest.param(n, marks=pytest.mark.slow) for n in ALL_APPLICATIONS],
)
def test_application_prunesAt30Percent_runsAndShrinks(name: str) -> None:
    side = MIN_SIDE.get(name, 32)
    model = getattr(keras.applications, name)(weights=None, input_shape=(side, side, 3), classes=7)
    x = np.random.default_rng(0).uniform(0, 255, (2, side, side, 3)).astype("float32")
    for criterion in ("bn_scale", "l1"):
        result = prune(model, PruneSpec(ratio=0.3, criterion=criterion))
        y = result.model(x, training=False)
        assert tuple(y.shape) == (2, 7)
        assert np.all(np.isfinite(np.asarray(y)))
        params = result.model.count_params()
        assert params == result.plan.params_after
        assert params < 0.9 * model.count_params(), (name, criterion, params)
        assert result.plan.flops_after < result.plan.flops_before
        del result
        keras.backend.clear_session(free_memory=True)


EXACT = {
    "ResNet50": False,
    "MobileNetV2": False,
    "EfficientNetB0": False,
    "DenseNet121": False,
    "MobileNetV3Small": False,
    "Xception": False,
    "NASNetMobile": True,
    "InceptionResNetV2": True,
    "EfficientNetV2B0": True,
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if slow else n for n, slow in sorted(EXACT.items())],
)
def test_application_deadChannelsRemoved_sameOutputs(name: str) -> None:
    side = MIN_SIDE.get(name, 32)
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(side, side, 3), classes=7, classifier_activation=None
    )
    randomize(model)
    plan = make_plan(model, PruneSpec(ratio=0.3, criterion="random", seed=7))
    kill_pruned_channels(model, plan)
    pruned = apply_plan(model, plan)
    assert pruned.count_params() < 0.8 * model.count_params()
    x = np.random.default_rng(0).uniform(0, 255, (2, side, side, 3)).astype("float32")
    assert_same_outputs(model, pruned, x, tol=1e-3)
