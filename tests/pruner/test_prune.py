"""Behaviour of prune / make_plan / apply_plan on the study's architectures."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from secateur.pruner import PruneSpec, PruningPlan, analyze, apply_plan, make_plan, prune

from .conftest import (
    ARCHITECTURES,
    assert_same_outputs,
    flatten_dense,
    images,
    kill_pruned_channels,
    mobilenetv2_block,
    randomize,
    resnet_projection,
    study_vgg16_bn,
)


def _build(name: str):
    builder, shape = ARCHITECTURES[name]
    return randomize(builder()), shape


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_prune_ratioZero_sameOutputs(name: str) -> None:
    model, shape = _build(name)
    result = prune(model, PruneSpec(ratio=0.0))
    x = images(shape)
    np.testing.assert_array_equal(np.asarray(result.model(x)), np.asarray(model(x)))
    assert result.model.count_params() == model.count_params()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("criterion", ["random", "bn_scale"])
def test_prune_deadChannelsRemoved_sameOutputs(name: str, criterion: str) -> None:
    model, shape = _build(name)
    plan = make_plan(model, PruneSpec(ratio=0.4, criterion=criterion, seed=3))
    assert plan.removed_channels > 0
    kill_pruned_channels(model, plan)
    pruned = apply_plan(model, plan)
    assert pruned.count_params() < model.count_params()
    assert_same_outputs(model, pruned, images(shape))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_prune_paramsAndFlops_matchPlanPrediction(name: str) -> None:
    model, _ = _build(name)
    result = prune(model, PruneSpec(ratio=0.5, criterion="l1", scope="layerwise"))
    assert result.model.count_params() == result.plan.params_after
    params, flops = analyze(result.model).count()
    assert params == result.plan.params_after
    assert flops == result.plan.flops_after
    assert result.plan.flops_after < result.plan.flops_before
    assert analyze(model).count() == (result.plan.params_before, result.plan.flops_before)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("round_to,min_channels", [(1, 1), (8, 1), (4, 12), (3, 5)])
def test_plan_roundToAndMinChannels_holdInEveryGroup(scope, round_to, min_channels) -> None:
    model = randomize(study_vgg16_bn())
    spec = PruneSpec(ratio=0.6, scope=scope, round_to=round_to, min_channels=min_channels)
    plan = make_plan(model, spec)
    assert plan.removed_channels > 0
    for g in plan.groups:
        assert 1 <= g.size_after <= g.size_before
        if g.pruned:
            assert g.size_after % round_to == 0, g
            assert g.size_after >= min(min_channels, g.size_before), g
    result = apply_plan(model, plan)
    assert result.count_params() == plan.params_after


def test_plan_globalRatio_removesRequestedShareOfChannels() -> None:
    model = randomize(study_vgg16_bn())
    plan = make_plan(model, PruneSpec(ratio=0.3, scope="global"))
    assert plan.removed_channels == round(0.3 * plan.prunable_channels)
    sizes = {g.origins[0]: g.size_after for g in plan.groups if g.pruned}
    # Global ranking by |gamma| is free to cut layers unevenly.
    assert len(set(sizes.values())) > 1


def test_plan_bnScale_removesSmallestGammas() -> None:
    model = randomize(study_vgg16_bn())
    bn = model.get_layer("block3_conv2_bn")
    weights = [w.numpy() for w in bn.weights]
    weights[0][[5, 17, 200]] = 0.0
    bn.set_weights(weights)
    plan = make_plan(model, PruneSpec(ratio=3 / 256, scope="layerwise", criterion="bn_scale"))
    group = next(g for g in plan.groups if "block3_conv2" in g.origins)
    assert group.size_after == 253
    assert not {5, 17, 200} & set(group.kept)
    assert group.criterion == "bn_scale"


def test_plan_bnScaleWithoutBatchNorm_fallsBackToL1AndSaysSo() -> None:
    model = flatten_dense()
    plan = make_plan(model, PruneSpec(ratio=0.3, criterion="bn_scale"))
    by_origin = {g.origins[0]: g for g in plan.groups}
    assert by_origin["conv1"].criterion == "bn_scale"
    assert by_origin["conv2"].criterion == "l1"
    assert "no BatchNormalization" in by_origin["conv2"].fallback


def test_plan_frozenGroups_touchingInputsAndOutputs() -> None:
    model = resnet_projection()
    plan = make_plan(model, PruneSpec(ratio=0.5))
    frozen = {o: g.frozen for g in plan.groups for o in g.origins if g.frozen}
    assert any(
        "touches model input" in r
        for r in frozen["input:" + model.inputs[0]._keras_history[0].name]
    )
    assert any("touches model output" in r for r in frozen["head"])
    assert not any(g.pruned for g in plan.groups if g.frozen)


def test_plan_roundTripsThroughJson_andReplaysIdentically() -> None:
    model, shape = _build("mobilenetv2_block")
    spec = PruneSpec(ratio=0.5, criterion="l2", scope="layerwise")
    direct = prune(model, spec)
    data = json.loads(json.dumps(direct.plan.to_dict()))
    replayed = apply_plan(model, PruningPlan.from_dict(data))
    x = images(shape)
    np.testing.assert_array_equal(np.asarray(replayed(x)), np.asarray(direct.model(x)))
    assert PruningPlan.from_dict(data).to_dict() == direct.plan.to_dict()


def test_plan_replaysOnSavedAndReloadedModel(tmp_path) -> None:
    model, shape = _build("densenet_chain")
    plan = make_plan(model, PruneSpec(ratio=0.3))
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    x = images(shape)
    np.testing.assert_allclose(
        np.asarray(apply_plan(reloaded, plan)(x)), np.asarray(apply_plan(model, plan)(x)), atol=1e-5
    )


def test_makePlan_leavesModelUntouched() -> None:
    model, shape = _build("resnet_projection")
    before = [w.numpy().copy() for w in model.weights]
    x = images(shape)
    y = np.asarray(model(x))
    result = prune(model, PruneSpec(ratio=0.5))
    assert result.model is not model
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())
    np.testing.assert_array_equal(y, np.asarray(model(x)))


def test_applyPlan_noReload_sameArchitectureFreshWeights() -> None:
    model, shape = _build("mobilenetv2_block")
    plan = make_plan(model, PruneSpec(ratio=0.4))
    reloaded = apply_plan(model, plan, reload_weights=True)
    fresh = apply_plan(model, plan, reload_weights=False)
    assert [w.shape for w in fresh.weights] == [w.shape for w in reloaded.weights]
    assert fresh.count_params() == plan.params_after
    kernels = [(a, b) for a, b in zip(fresh.weights, reloaded.weights) if a.name == "kernel"]
    assert all(not np.allclose(a.numpy(), b.numpy()) for a, b in kernels)
    x = images(shape)
    assert not np.allclose(np.asarray(fresh(x)), np.asarray(reloaded(x)))


def test_prune_specReloadFalse_usedByPrune() -> None:
    model, _ = _build("flatten_dense")
    spec = PruneSpec(ratio=0.5, reload_weights=False)
    result = prune(model, spec)
    kept = result.plan.groups[[g.origins[0] for g in result.plan.groups].index("conv1")].kept
    original = model.get_layer("conv1").kernel.numpy()[..., kept]
    assert not np.allclose(result.model.get_layer("conv1").kernel.numpy(), original)


def test_prune_physicallySmaller_noMaskLayers() -> None:
    model, _ = _build("vgg16_bn_cifar")
    result = prune(model, PruneSpec(ratio=0.5))
    assert [type(layer) for layer in result.model.layers] == [type(layer) for layer in model.layers]
    conv = result.model.get_layer("block1_conv1")
    assert conv.kernel.shape[-1] == conv.filters < 64
    assert result.model.get_layer("block1_conv2").kernel.shape[2] == conv.filters


def test_prune_exclude_keepsLayerWidths() -> None:
    model = mobilenetv2_block()
    result = prune(model, PruneSpec(ratio=0.5, exclude=("b1_expand",)))
    assert result.model.get_layer("b1_expand").filters == 96
    assert result.model.get_layer("b0_expand").filters < 96
    frozen = [g for g in result.plan.groups if any("excluded" in r for r in g.frozen)]
    assert frozen and not any(g.pruned for g in frozen)


def test_prune_compiledModel_staysCompiled() -> None:
    model = flatten_dense()
    model.compile(optimizer="sgd", loss="mse")
    result = prune(model, PruneSpec(ratio=0.3))
    assert result.model.compiled
    result.model.fit(images((8, 8, 3), n=4), np.zeros((4, 3)), verbose=0)


def test_plan_summaryAndLayerWidths_describeTheCut() -> None:
    model = study_vgg16_bn()
    plan = make_plan(model, PruneSpec(ratio=0.5, scope="layerwise"))
    assert plan.layer_widths["block1_conv1"] == (64, 32)
    assert "params" in plan.summary()
