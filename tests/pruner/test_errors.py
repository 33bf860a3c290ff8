"""Bad input raises typed errors that say what was received."""

from __future__ import annotations

import copy

import keras
import pytest

from secateur.pruner import (
    EmptyGroupError,
    InvalidSpecError,
    PlanError,
    PlanMismatchError,
    PruneSpec,
    PruningPlan,
    SecateurError,
    UnsupportedModelError,
    apply_plan,
    make_plan,
    prune,
)

from .conftest import flatten_dense, mobilenetv2_block


@pytest.mark.parametrize(
    "kwargs,field,received",
    [
        ({"ratio": 1.0}, "ratio", "ratio=1.0"),
        ({"ratio": -0.1}, "ratio", "ratio=-0.1"),
        ({"ratio": float("nan")}, "ratio", "ratio=nan"),
        ({"ratio": "0.3"}, "ratio", "ratio='0.3'"),
        ({"ratio": True}, "ratio", "ratio=True"),
        ({"criterion": "hessian"}, "criterion", "criterion='hessian'"),
        ({"scope": "local"}, "scope", "scope='local'"),
        ({"round_to": 0}, "round_to", "round_to=0"),
        ({"round_to": 2.5}, "round_to", "round_to=2.5"),
        ({"min_channels": 0}, "min_channels", "min_channels=0"),
        ({"exclude": "conv1"}, "exclude", "exclude='conv1'"),
    ],
)
def test_spec_badField_raisesInvalidSpecErrorNamingIt(kwargs, field, received) -> None:
    with pytest.raises(InvalidSpecError) as info:
        PruneSpec(**kwargs)
    assert info.value.field == field
    assert str(info.value).endswith(received)
    assert isinstance(info.value, ValueError)  # usable as a plain ValueError too


def test_spec_fromDict_unknownKey_rejected() -> None:
    with pytest.raises(InvalidSpecError, match="ratoi"):
        PruneSpec.from_dict({"ratoi": 0.3})
    spec = PruneSpec.from_dict({"ratio": 0.2, "exclude": ["a"]})
    assert spec == PruneSpec(ratio=0.2, exclude=("a",))
    assert PruneSpec.from_dict(spec.to_dict()) == spec


def test_prune_subclassedModel_raisesUnsupportedModelError() -> None:
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(keras.ops.zeros((1, 8, 8, 3)))
    with pytest.raises(UnsupportedModelError, match=r"Received: .*Net"):
        prune(net, PruneSpec(ratio=0.3))


def test_prune_unbuiltSequential_raisesUnsupportedModelError() -> None:
    seq = keras.Sequential([keras.layers.Dense(4)])
    with pytest.raises(UnsupportedModelError, match="unbuilt Sequential"):
        make_plan(seq, PruneSpec())


def test_prune_notAModel_raisesUnsupportedModelError() -> None:
    with pytest.raises(UnsupportedModelError, match=r"Received: builtins\.str"):
        make_plan("model.keras", PruneSpec())


def test_prune_excludeUnknownLayer_raises() -> None:
    with pytest.raises(InvalidSpecError, match="Received: 'nope'"):
        make_plan(flatten_dense(), PruneSpec(exclude=("nope",)))


def _plan_dict():
    model = mobilenetv2_block()
    return model, make_plan(model, PruneSpec(ratio=0.5)).to_dict()


def test_applyPlan_groupWithZeroChannels_raisesEmptyGroupError() -> None:
    model, data = _plan_dict()
    g = next(g for g in data["groups"] if g["size_after"] < g["size_before"])
    g["kept"], g["size_after"] = [], 0
    with pytest.raises(EmptyGroupError, match="keeps 0 of"):
        PruningPlan.from_dict(data)
    plan = make_plan(model, PruneSpec(ratio=0.5))
    plan.groups[g["id"]].kept, plan.groups[g["id"]].size_after = [], 0
    with pytest.raises(EmptyGroupError):
        apply_plan(model, plan)


def test_applyPlan_planForOtherModel_raisesPlanMismatchError() -> None:
    _, data = _plan_dict()
    with pytest.raises(PlanMismatchError, match="does not describe this model"):
        apply_plan(flatten_dense(), PruningPlan.from_dict(data))


def test_planPrunesFrozenGroup_refusedByValidate_withTheReason() -> None:
    _, data = _plan_dict()
    g = next(g for g in data["groups"] if g["frozen"] and g["size_before"] > 1)
    g["kept"], g["size_after"] = g["kept"][:1], 1
    with pytest.raises(PlanError, match="frozen group cannot prune") as exc:
        PruningPlan.from_dict(data)
    assert g["frozen"][0] in str(exc.value)


def test_applyPlan_prunesGroupFrozenInThisModel_raisesPlanMismatchError() -> None:
    model, data = _plan_dict()
    g = next(g for g in data["groups"] if g["frozen"] and g["size_before"] > 1)
    g["kept"], g["size_after"], g["frozen"] = g["kept"][:1], 1, []
    with pytest.raises(PlanMismatchError, match="cannot prune"):
        apply_plan(model, PruningPlan.from_dict(data))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.update(version=99), "version"),
        (lambda d: d.pop("groups"), "malformed"),
        (lambda d: d["groups"][1].update(kept=[0, 0]), "kept"),
    ],
)
def test_planFromDict_malformed_raisesPlanError(mutate, match) -> None:
    _, data = _plan_dict()
    data = copy.deepcopy(data)
    mutate(data)
    with pytest.raises(PlanError, match=match):
        PruningPlan.from_dict(data)


def test_errors_shareOneBaseClass() -> None:
    for cls in (
        InvalidSpecError,
        UnsupportedModelError,
        PlanError,
        PlanMismatchError,
        EmptyGroupError,
    ):
        assert issubclass(cls, SecateurError)
