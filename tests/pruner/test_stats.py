"""Accuracy intervals: Wilson and Newcombe against the published values."""

from __future__ import annotations

import math

import pytest

from secateur.pruner.stats import (
    accuracy_drop,
    newcombe_difference,
    paired_drop,
    resolves,
    wilson,
)


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


def _paired(n: int, base_right: int, lost: int, gained: int) -> tuple[list[bool], list[bool]]:
    """Outcomes on n images: the base right on the first ``base_right``; the pruned model
    loses ``lost`` of those and gains ``gained`` of the others."""
    base = [i < base_right for i in range(n)]
    pruned = list(base)
    for i in range(lost):
        pruned[i] = False
    for i in range(base_right, base_right + gained):
        pruned[i] = True
    return base, pruned


def test_pairedDrop_oneRun_isTheMcNemarWaldInterval() -> None:
    # n10 = 100 images only the base gets right, n01 = 50 only the pruned one:
    # drop 0.5 pt, half-width 1.96 * sqrt(150 - 50^2 / 10000) / 10000.
    base, pruned = _paired(10_000, 9_000, lost=100, gained=50)
    drop = paired_drop(base, [pruned])
    half = 1.959963984540054 * math.sqrt(150 - 50**2 / 10_000) / 10_000
    assert drop.drop == pytest.approx(0.005)
    assert (drop.low, drop.high) == (pytest.approx(0.005 - half), pytest.approx(0.005 + half))
    # Far narrower than two independent intervals on the same counts.
    assert drop.half_width < accuracy_drop((9_000, 10_000), (8_950, 10_000)).half_width / 3


def test_pairedDrop_identicalRuns_addNoSeedSpread() -> None:
    base, pruned = _paired(2_000, 1_800, lost=30, gained=10)
    one = paired_drop(base, [pruned])
    three = paired_drop(base, [pruned, pruned, pruned])
    assert (three.drop, three.low, three.high) == pytest.approx((one.drop, one.low, one.high))


def test_pairedDrop_threeRuns_addTheSeedsTInterval() -> None:
    # The base gets all 1,000 right; the runs miss the first 10, 20 and 30 images
    # (drops 1, 2, 3 pt). Per image d = 1, 2/3, 1/3 (10 images each), else 0.
    base = [True] * 1_000
    runs = [[i >= k for i in range(1_000)] for k in (10, 20, 30)]
    drop = paired_drop(base, runs)
    var_d = (10 * 1 + 10 * 4 / 9 + 10 * 1 / 9) / 1_000 - 0.02**2
    images = 1.959963984540054 * math.sqrt(var_d) / math.sqrt(1_000)
    seeds = 4.303 * 0.01 / math.sqrt(3)  # sd of (0.01, 0.02, 0.03) is 0.01
    half = math.hypot(images, seeds)
    assert drop.drop == pytest.approx(0.02)
    assert (drop.low, drop.high) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))


def test_pairedDrop_refusesRunsOfAnotherLength() -> None:
    with pytest.raises(ValueError, match=r"Received: base \(3,\), runs \(1, 2\)"):
        paired_drop([True, False, True], [[True, False]])
    with pytest.raises(ValueError, match="Received:"):
        paired_drop([], [])
