"""Layout-aware rounding: round_to="auto" per device, logical vs padded params."""

from __future__ import annotations

import keras
import pytest

from secateur.pruner import InvalidSpecError, PruneSpec, make_plan
from secateur.pruner.hardware import (
    AUTO_ROUND_TO,
    detect_device_kind,
    layer_params,
    padded_size,
    resolve_round_to,
)
from secateur.pruner.models import vgg16_bn


def test_paddedSize_tpuTilesPadMinorTo128AndSecondMinorTo8() -> None:
    assert padded_size((3, 3, 60, 100), (8, 128)) == 3 * 3 * 64 * 128
    assert padded_size((100,), (8, 128)) == 128
    assert padded_size((3, 3, 64, 128), (8, 128)) == 3 * 3 * 64 * 128
    assert padded_size((17, 30), (1, 16)) == 17 * 32


@pytest.mark.parametrize("kind,multiple", sorted(AUTO_ROUND_TO.items()))
def test_makePlan_roundToAuto_usesTheDevicesMultiple(kind, multiple) -> None:
    plan = make_plan(
        vgg16_bn(), PruneSpec(ratio=0.3, round_to="auto", scope="layerwise"), device_kind=kind
    )
    assert plan.round_to == multiple and plan.device_kind == kind
    assert plan.spec["round_to"] == "auto"
    pruned = [g for g in plan.groups if g.pruned]
    assert pruned and all(g.size_after % multiple == 0 for g in pruned)


def test_roundToAuto_onThisMachine_isCpu() -> None:
    assert detect_device_kind() == "CPU"
    assert resolve_round_to("auto") == 16 and resolve_round_to(4) == 4
    with pytest.raises(InvalidSpecError, match=r"integer in \[1, 4096\] or 'auto'"):
        PruneSpec(round_to="max")


def test_layerParams_logicalVsPadded_perLayerOnTpu() -> None:
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(100, 3, use_bias=False, name="c")(inp)
    model = keras.Model(inp, keras.layers.Dense(10, name="d")(x))
    rows = {r["layer"]: r for r in layer_params(model, "TPU")}
    assert rows["c"] == {"layer": "c", "params": 2700, "padded_params": 3 * 3 * 8 * 128}
    assert rows["d"]["params"] == 1010 and rows["d"]["padded_params"] == 104 * 128 + 128
