"""The plan's report: share of channels in prunable groups, and why the rest froze."""

from __future__ import annotations

import json

import keras
import pytest

from secateur.pruner import PruneSpec, PruningPlan, make_plan
from secateur.pruner.plan import GroupPlan
from secateur.pruner.plan_report import (
    describe,
    frozen_reasons,
    normalise_reason,
    prunable_share,
)

layers = keras.layers


class Doubler(keras.layers.Layer):
    """A custom layer no handler knows: it freezes the channels around it."""

    def call(self, x):  # type: ignore[no-untyped-def]
        return x * 2.0


def _two_unknown_layers() -> keras.Model:
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, name="c1")(inp)
    x = Doubler(name="d1")(x)
    x = layers.Conv2D(6, 1, name="c2")(x)
    x = Doubler(name="d2")(x)
    x = layers.Conv2D(4, 1, name="c3")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Conv2D(5, 1, name="c4")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(2, name="head")(x))


def _group(
    gid: int, size: int, frozen: list[str], kind: str = "channels", unit: int = 1
) -> GroupPlan:
    keep = list(range(size))
    return GroupPlan(gid, [f"g{gid}"], [], size, size, keep, frozen=frozen, kind=kind, unit=unit)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        (
            "layer 'stage_1/block_0/se' (SqueezeExcite): layer class is not in the registry",
            "SqueezeExcite: layer class is not in the registry",
        ),
        ("'add_3' couples channels of layouts", "<layer> couples channels of layouts"),
        ("channel axis of 'conv' has unknown size", "channel axis of <layer> has unknown size"),
        ("layer 'x' is excluded by the spec", "layer <layer> is excluded by the spec"),
        ("touches model output", "touches model output"),
        (
            "layer 'attn/reshape' (Reshape): reshape (16, 16) -> (16, 2, 8) does not keep it",
            "Reshape: reshape <shape> -> <shape> does not keep it",
        ),
        ("layer 'r' (Reshape): (None, -1, 4) (a note)", "Reshape: <shape> (a note)"),
    ],
)  # fmt: skip
def test_normaliseReason_dropsLayerNames_keepsTheClass(raw: str, normalised: str) -> None:
    assert normalise_reason(raw) == normalised


def test_frozenReasons_sumChannelsPerReason_mostFirst_headsApart() -> None:
    groups = [
        _group(0, 3, ["touches model input"]),
        _group(1, 16, ["layer 'a/se' (SE): layer class is not in the registry"]),
        _group(2, 32, ["layer 'b/se' (SE): layer class is not in the registry", "a note 'x'"]),
        _group(3, 16, [], unit=4),  # 16 blocks of 4 channels: 64 channels
        _group(4, 10, ["'add' couples channels of different layouts"], unit=4),
        _group(5, 4, ["a single head"], kind="heads"),
    ]
    reasons = frozen_reasons(groups)
    assert [(r.reason, r.channels, r.groups) for r in reasons] == [
        ("SE: layer class is not in the registry", 48, 2),
        ("<layer> couples channels of different layouts", 40, 1),
        ("a note <layer>", 32, 1),
        ("touches model input", 3, 1),
    ]
    assert reasons[0].example == "layer 'a/se' (SE): layer class is not in the registry"
    assert prunable_share(groups) == pytest.approx(64 / (3 + 16 + 32 + 64 + 40))
    assert prunable_share([]) == 0.0
    text = describe(prunable_share(groups), reasons, top=2)
    assert text == (
        "41% of channels prunable; frozen: SE: layer class is not in the registry (48 ch); "
        "<layer> couples channels of different layouts (40 ch); +2 more"
    )


def test_plan_reportsShareAndReasons_inSummaryAndJson() -> None:
    plan = make_plan(_two_unknown_layers(), PruneSpec(ratio=0.3))
    sizes = {g.origins[0]: g.size_before for g in plan.groups}
    total = sum(sizes.values())
    free = sum(g.size_before for g in plan.groups if not g.frozen)
    assert free == sizes["c3"] + sizes["c4"]
    assert plan.prunable_share == pytest.approx(free / total)
    # d1 and d2 freeze their inputs (c1, c2) and outputs: one reason, four groups.
    top = plan.frozen_reasons[0]
    assert top["reason"] == "Doubler: layer class is not in the registry"
    assert top["channels"] == 2 * (sizes["c1"] + sizes["c2"]) and top["groups"] == 4
    assert [r["channels"] for r in plan.frozen_reasons] == sorted(
        (r["channels"] for r in plan.frozen_reasons), reverse=True
    )
    assert f"{plan.prunable_share:.0%} of channels prunable" in plan.summary()
    assert "Doubler: layer class is not in the registry (28 ch)" in plan.summary()
    data = json.loads(plan.to_json())
    assert data["prunable_share"] == plan.prunable_share
    assert data["frozen_reasons"] == plan.frozen_reasons
    assert PruningPlan.from_dict(data).to_dict() == plan.to_dict()


def test_planWithoutTheReport_loads_andComputesIt() -> None:
    plan = make_plan(_two_unknown_layers(), PruneSpec(ratio=0.3))
    old = plan.to_dict()
    del old["prunable_share"], old["frozen_reasons"]
    loaded = PruningPlan.from_dict(old)
    assert loaded.prunable_share == plan.prunable_share
    assert loaded.frozen_reasons == plan.frozen_reasons
