"""Confidence intervals for accuracies measured on a finite evaluation set.

An accuracy of 93.1% on 360 examples is 335 successes in 360 trials; its 95%
interval is several points wide. :func:`wilson` gives that interval for one
accuracy, :func:`newcombe_difference` for the drop between two, and
:func:`drop_summary` states a gate's drop with it. When the per-example
outcomes are at hand, :func:`paired_drop` gives the narrower paired interval
(both models on the same images), over several runs. No TensorFlow, no SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The two-sided 95% normal quantile (Phi^-1(0.975)).
Z95 = 1.959963984540054
#: Two-sided 95% Student t quantiles by degrees of freedom (1..30).
T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


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


def paired_drop(
    base: Sequence[bool] | np.ndarray, runs: Sequence[Sequence[bool]] | np.ndarray
) -> Drop:
    """The accuracy drop of one or more runs from ``base``, paired on the same images.

    ``base`` holds whether the original classified each evaluation image
    correctly; ``runs`` one such row per run of the pruned model (e.g. one per
    seed), on the same images in the same order. With ``d_i = base_i -
    mean_s runs[s][i]`` the drop is ``mean_i d_i``. Its 95% interval has two
    parts, added in quadrature:

    - the images: ``z * sd(d) / sqrt(N)`` (population sd). For one run this is
      the Wald interval of a difference of paired proportions, the one that
      goes with McNemar's test: ``sqrt(n10 + n01 - (n10 - n01)^2 / N) / N``
      with ``n10`` images only the original gets right and ``n01`` only the
      pruned one. Images both get right or both get wrong add nothing, which
      is why it is far narrower than two independent intervals.
    - the runs: ``t(S-1) * sd(D_s) / sqrt(S)`` over the per-run drops ``D_s``
      (on the fixed images: the spread of pruning and fine-tuning itself).

    Args:
        base: N booleans (or 0/1).
        runs: S rows of N booleans.

    Returns:
        The mean drop (fraction) and its interval.

    Raises:
        ValueError: no images, no runs, or rows of different lengths.
    """
    b = np.asarray(base, dtype=np.float64)
    p = np.asarray(runs, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    if b.ndim != 1 or b.size == 0 or p.ndim != 2 or p.shape[0] == 0 or p.shape[1] != b.size:
        raise ValueError(
            "a paired drop needs N >= 1 outcomes of the original and S >= 1 runs of N. "
            f"Received: base {b.shape}, runs {p.shape}"
        )
    d = b - p.mean(axis=0)
    drop = float(d.mean())
    images = Z95 * float(d.std()) / math.sqrt(b.size)
    seeds = 0.0
    if p.shape[0] > 1:
        per_run = b.mean() - p.mean(axis=1)
        t = T95[min(p.shape[0] - 1, len(T95)) - 1]
        seeds = t * float(per_run.std(ddof=1)) / math.sqrt(p.shape[0])
    half = math.hypot(images, seeds)
    return Drop(drop, drop - half, drop + half)
