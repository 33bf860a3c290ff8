"""The cost model's prediction: multiplicative across a layer's two sides, in (0, 1]."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from secateur.pruner.costfit import TermModel, cost_terms, fit_times
from secateur.pruner.plan import keep_function
from secateur.pruner.tracing import analyze

layers = keras.layers


def _chain() -> Any:
    """conv0 (3 -> 16) -> conv1 (16 -> 32) -> conv2 (32 -> 32) -> dense (32 -> 10)."""
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for i, width in enumerate((16, 32, 32)):
        x = layers.Conv2D(width, 3, padding="same", name=f"conv{i}")(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10, name="head")(x))


@pytest.fixture(scope="module")
def traced() -> tuple[Any, dict[str, Any]]:
    graph = analyze(_chain())
    groups = {g.origins[0]: g for g in graph.groups() if g.prunable and g.kind == "channels"}
    assert sorted(groups) == ["conv0", "conv1", "conv2"]
    return graph, groups


def _counted_flops(graph: Any, widths: dict[int, int]) -> int:
    kept = {g.id: np.arange(widths.get(g.id, g.size)) for g in graph.groups()}
    return graph.count(keep_function(graph, kept))[1]


def test_prediction_bothSidesOfALayerShrink_isMultiplicative_notDoubleCounted(traced) -> None:
    graph, groups = traced
    terms = cost_terms(graph, list(groups.values()))
    # Toy device, exactly known: a step costs 1 s per GFLOP plus a 0.01 s remainder.
    times = terms.flops / 1e9
    base = float(times.sum()) + 0.01
    model = TermModel(base, terms, fitted=times, prior=times)
    g0, g1 = groups["conv0"].id, groups["conv1"].id
    plan = {g0: 8, g1: 16}  # conv1's input and output both halve: its cost quarters
    truth = 0.01 + _counted_flops(graph, plan) / 1e9
    assert model.figure(plan) == pytest.approx(truth, rel=1e-12)
    assert model.predict(plan) == pytest.approx(truth / base, rel=1e-12)
    conv1 = 2 * 8 * 8 * 3 * 3 * 16 * 32 / 1e9  # conv1's FLOPs per example, in seconds
    additive = base - model.saving(g0, 8) - model.saving(g1, 16)
    # Adding single-group savings removes half of conv1 twice: a quarter too much.
    assert additive == pytest.approx(truth - conv1 / 4, rel=1e-9)


def test_prediction_anyPlanAnyProfile_staysWithinZeroAndOne(traced) -> None:
    graph, groups = traced
    gs = list(groups.values())
    terms = cost_terms(graph, gs)
    rng = np.random.default_rng(0)
    base = 0.5
    for trial in range(20):
        # A loaded CPU: deltas of either sign, their sum far beyond the whole step.
        cuts = [
            (g.id, int(w), float(rng.uniform(-2.0, 0.5)))
            for g in gs
            for w in rng.integers(1, g.size, size=3)
        ]
        fitted, prior = fit_times(terms, base, cuts, prior_weight=0.0 if trial % 2 else 0.5)
        assert (fitted >= 0).all() and fitted.sum() <= base * (1 + 1e-12)
        for weight in (0.0, 0.5, 1.0):
            model = TermModel(base, terms, fitted, prior, prior_weight=weight)
            for _ in range(10):
                plan = {g.id: int(rng.integers(1, g.size + 1)) for g in gs}
                assert 0 < model.predict(plan) <= 1
            assert model.predict({g.id: 1 for g in gs}) > 0
            assert model.predict({}) == pytest.approx(1.0)


def test_fit_priorOnly_predictsTheFlopsRatio_andCleanCutsAreFitted(traced) -> None:
    graph, groups = traced
    gs = list(groups.values())
    terms = cost_terms(graph, gs)
    total = _counted_flops(graph, {})
    plan = {gs[0].id: 4, gs[1].id: 20, gs[2].id: 9}
    fitted, prior = fit_times(terms, 2.0, [])
    model = TermModel(2.0, terms, fitted, prior, prior_weight=1.0)
    assert model.predict(plan) == pytest.approx(_counted_flops(graph, plan) / total, rel=1e-9)
    # Cuts measured on a device whose step is exactly the FLOPs (no remainder):
    # the fit reproduces every single-group figure it was given.
    cuts = [
        (g.id, w, (_counted_flops(graph, {g.id: w}) - total) / 1e9)
        for g in gs
        for w in (g.size // 4, g.size // 2)
    ]
    fitted, prior = fit_times(terms, total / 1e9, cuts, prior_weight=1e-6, sweeps=2000)
    model = TermModel(total / 1e9, terms, fitted, prior)
    for gid, w, delta in cuts:
        assert model.figure({gid: w}) - total / 1e9 == pytest.approx(delta, rel=1e-3)


def test_terms_groupOnBothAxesOfAWeight_scalesWithItsSquare() -> None:
    # A residual dense block: the second kernel's input and output are one group.
    inputs = keras.Input((8,))
    a = layers.Dense(16, name="d0")(inputs)
    b = layers.Dense(16, name="d1")(a)
    x = layers.Add()([a, b])
    graph = analyze(keras.Model(inputs, layers.Dense(4, name="head")(x)))
    (group,) = [g for g in graph.groups() if g.prunable and g.kind == "channels"]
    terms = cost_terms(graph, [group])
    model = TermModel(1.0, terms, fitted=terms.flops / terms.flops.sum(), prior=terms.flops)
    total = _counted_flops(graph, {})
    for width in (1, 5, 8, 12):
        assert model.predict({group.id: width}) == pytest.approx(
            _counted_flops(graph, {group.id: width}) / total, rel=1e-9
        )
