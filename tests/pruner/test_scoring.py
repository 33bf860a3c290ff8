"""The importance registry: criteria are one function plus one registration."""

from __future__ import annotations

from collections.abc import Iterator

import keras
import numpy as np
import pytest

from secateur.pruner import InvalidSpecError, PruneSpec, analyze, make_plan, scoring
from secateur.pruner.scoring import GroupScore, GroupView, criteria, register_criterion

from .conftest import flatten_dense, randomize


@pytest.fixture
def registered() -> Iterator[str]:
    """A criterion scoring each channel by its index (the last ones are kept)."""
    name = "index_for_test"

    @register_criterion(name)
    def by_index(view: GroupView) -> GroupScore:
        return GroupScore(np.arange(view.group.size, dtype=np.float64), name)

    yield name
    del scoring._CRITERIA[name]


def test_criteria_listsBuiltinsInOrder() -> None:
    assert criteria()[:4] == ("bn_scale", "l1", "l2", "random")


def test_registerCriterion_usableBySpecAndPlan(registered: str) -> None:
    assert registered in criteria()
    model = randomize(flatten_dense())
    plan = make_plan(model, PruneSpec(ratio=0.5, criterion=registered, scope="layerwise"))
    for g in plan.groups:
        if g.pruned:
            assert g.criterion == registered
            assert g.kept == list(range(g.size_before - g.size_after, g.size_before))


def test_registerCriterion_duplicateName_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        register_criterion("l1")(scoring.l1)


def test_spec_unknownCriterion_listsRegistry() -> None:
    with pytest.raises(InvalidSpecError, match="bn_scale, l1, l2, random, lamp, taylor") as info:
        PruneSpec(criterion="hessian")
    assert info.value.field == "criterion"


def test_scoreGroup_unknownCriterion_typedError() -> None:
    graph = analyze(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
    group = graph.groups()[0]
    with pytest.raises(InvalidSpecError):
        scoring.score_group(graph, group, "nope", lambda p, i: np.zeros(1), np.random.default_rng())


@pytest.mark.parametrize("criterion", ["bn_scale", "l1", "l2", "random"])
def test_builtinCriteria_matchReferenceFormulas(criterion: str) -> None:
    """The registry keeps the scores of the former if-chain."""
    model = randomize(flatten_dense())
    graph = analyze(model)
    rng = np.random.default_rng(0)
    conv2 = next(g for g in graph.groups() if "conv2" in g.origins)
    bn1 = next(g for g in graph.groups() if "conv1" in g.origins)
    weights = {
        "conv1": model.get_layer("conv1").kernel.numpy(),
        "conv2": model.get_layer("conv2").kernel.numpy(),
        "bn1": model.get_layer("bn1").gamma.numpy(),
    }

    def get(path: str, idx: int) -> np.ndarray:
        return np.asarray(graph.layers[path].weights[idx].numpy())

    score = scoring.score_group(graph, conv2, criterion, get, rng).scores
    flat = weights["conv2"].reshape(-1, weights["conv2"].shape[-1])
    if criterion == "random":
        np.testing.assert_array_equal(score, np.random.default_rng(0).random(conv2.size))
    elif criterion == "l2":
        np.testing.assert_allclose(score, np.sqrt(np.mean(flat**2, axis=0)), rtol=1e-6)
    else:  # l1, and bn_scale falls back to l1 for conv2 (no BatchNorm)
        np.testing.assert_allclose(score, np.mean(np.abs(flat), axis=0), rtol=1e-6)
    if criterion == "bn_scale":
        bn = scoring.score_group(graph, bn1, criterion, get, rng)
        np.testing.assert_allclose(bn.scores, np.abs(weights["bn1"]), rtol=1e-6)
        assert bn.fallback is None
