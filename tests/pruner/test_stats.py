"""Accuracy intervals: Wilson and Newcombe against the published values."""

from __future__ import annotations

import pytest

from secateur.pruner.stats import accuracy_drop, newcombe_difference, resolves, wilson


@pytest.mark.parametrize(
    ("correct", "total", "low", "high"),
    [
        # Newcombe (1998a), Table I, method 3 (Wilson score).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (29, 29, 0.8830, 1.0),
    ],
)
def test_wilson_publishedValues(correct: int, total: int, low: float, high: float) -> None:
    got = wilson(correct, total)
    assert got == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


def test_wilson_refusesImpossibleCounts() -> None:
    for correct, total in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError, match="Received: correct="):
            wilson(correct, total)


@pytest.mark.parametrize(
    ("a", "b", "low", "high"),
    [
        # Newcombe (1998b), Table II, method 10 (hybrid score).
        ((56, 70), (48, 80), 0.0524, 0.3339),
        ((9, 10), (3, 10), 0.1705, 0.8090),
        ((5, 56), (0, 29), -0.0381, 0.1926),
    ],
)
def test_newcombe_publishedValues(a, b, low, high) -> None:
    p1, p2 = a[0] / a[1], b[0] / b[1]
    got = newcombe_difference(p1, wilson(*a), p2, wilson(*b))
    assert got == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))
    drop = accuracy_drop(a, b)
    assert (drop.low, drop.high) == got and drop.drop == pytest.approx(p1 - p2)


def test_drop_statedInPoints_andResolution() -> None:
    # 93.1% -> 92.3% on 10000 examples: a 0.8 pt drop, resolved to about +-0.7 pt.
    drop = accuracy_drop((9310, 10000), (9230, 10000))
    assert str(drop) == "drop 0.8 pt, 95% CI [0.1, 1.5]"
    assert resolves(drop, 0.01) and not resolves(drop, 0.005)
    # 360 examples cannot tell a 1-point budget: the half-width is several points.
    small = accuracy_drop((335, 360), (332, 360))
    assert small.half_width > 0.03 and not resolves(small, 0.01)
