"""Confidence intervals for accuracies measured on a finite evaluation set.

An accuracy of 93.1% on 360 examples is 335 successes in 360 trials; its 95%
interval is several points wide. :func:`wilson` gives that interval for one
accuracy, :func:`newcombe_difference` for the drop between two, and
:func:`drop_summary` states a gate's drop with it. No TensorFlow, no SciPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The two-sided 95% normal quantile (Phi^-1(0.975)).
Z95 = 1.959963984540054


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``correct / total``.

    Unlike the normal approximation it stays inside [0, 1] and keeps its
    coverage near 0% and 100% and for small ``total`` (Wilson 1927;
    Newcombe 1998, "Two-sided confidence intervals for the single
    proportion", method 3).

    Raises:
        ValueError: ``total`` < 1 or ``correct`` outside [0, total].
    """
    if total < 1 or not 0 <= correct <= total:
        raise ValueError(
            f"an interval needs 0 <= correct <= total and total >= 1. "
            f"Received: correct={correct}, total={total}"
        )
    p = correct / total
    z2 = z * z
    denominator = 1.0 + z2 / total
    centre = (p + z2 / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    # Exact at the ends: 0 successes -> low 0, all successes -> high 1.
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


def newcombe_difference(
    p1: float, ci1: tuple[float, float], p2: float, ci2: tuple[float, float]
) -> tuple[float, float]:
    """Interval of ``p1 - p2`` from the two proportions' Wilson intervals.

    Newcombe's hybrid score interval (Newcombe 1998, "Interval estimation
    for the difference between independent proportions", method 10):
    ``low = d - sqrt((p1 - l1)^2 + (u2 - p2)^2)``,
    ``high = d + sqrt((u1 - p1)^2 + (p2 - l2)^2)``.

    It treats the two accuracies as independent. Here both are measured on
    the same evaluation set, where a pruned model is right mostly where its
    original is (positively correlated outcomes): the variance of the
    difference is then smaller than the independent one, so this interval
    is conservative, wider than a paired interval (Newcombe 1998b, which
    needs the per-example agreement table) would be, never narrower.
    """
    d = p1 - p2
    (l1, u1), (l2, u2) = ci1, ci2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return low, high


@dataclass(frozen=True)
class Drop:
    """An accuracy drop (original - pruned, fractions) with its 95% interval."""

    drop: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        return (
            f"drop {100 * self.drop:.1f} pt, 95% CI [{100 * self.low:.1f}, {100 * self.high:.1f}]"
        )


def accuracy_drop(original: tuple[int, int], pruned: tuple[int, int], z: float = Z95) -> Drop:
    """The drop from ``original`` to ``pruned`` accuracy, each ``(correct, total)``.

    The interval is :func:`newcombe_difference` of the two Wilson intervals.
    """
    (c1, n1), (c2, n2) = original, pruned
    p1, p2 = c1 / n1, c2 / n2
    low, high = newcombe_difference(p1, wilson(c1, n1, z), p2, wilson(c2, n2, z))
    return Drop(p1 - p2, low, high)


def resolves(drop: Drop, budget: float) -> bool:
    """Whether the evaluation set is large enough to tell a drop of ``budget``.

    False when the interval's half-width exceeds the budget: a candidate
    could then pass or fail the gate on which examples happened to be drawn.
    """
    return drop.half_width <= budget
