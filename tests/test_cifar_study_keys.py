"""The CIFAR-10 study's run cache: adding arms must not orphan the runs already cached.

Each run of ``benchmarks/cifar_study.py`` is cached under a key that hashes
what shapes it; the 102 runs of the published study are keyed by the names
pinned here. If a change to ``Arm`` or ``run_key`` moved them, the study would
silently redo hours of training (or ``--report-only`` would drop them).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

from cifar_study import arms, parse_args, run_key, stages

# File names of runs in the published study's cache (docs/cifar10_study_results.json).
PUBLISHED = {
    ("answer: sparsity + bn_scale, 3 epochs", 0.3, 0): (
        "answer--sparsity---bn-scale--3-epochs_r0.30_s0_73a56e70.json"
    ),
}


def _grid(argv: list[str]) -> dict[str, tuple]:
    args = parse_args([*argv, "--work", "/nonexistent"])
    return {name: (arm, ratios, args) for name, arm, ratios in arms(args)}


def test_runKey_publishedArmUnchangedByNewArms() -> None:
    grid = _grid([])
    for (name, ratio, seed), expected in PUBLISHED.items():
        arm, _, args = grid[name]
        assert run_key(name, arm, ratio, seed, args) == expected


def test_runKey_longArmFollowsItsOwnSparsity() -> None:
    name = "answer, long: sparsity 3 ep x 0.02 + bn_scale, 6 epochs decaying"
    default = _grid([])
    arm, _, args = default[name]
    assert arm.sparse == (3, 0.02)
    assert arm.stages == ((3, 0.01), (2, 0.001), (1, 0.0001))
    stronger = _grid(["--long-lam", "0.05"])
    other = next(n for n in stronger if n.startswith("answer, long"))
    arm2, _, args2 = stronger[other]
    assert arm2.sparse == (3, 0.05)
    assert run_key(other, arm2, 0.5, 0, args2) != run_key(name, arm, 0.5, 0, args)
    # the study's own sparsity flags do not touch the long arm's sparse copy
    moved = _grid(["--lam", "0.01"])
    assert moved[name][0] == arm


def test_stages_parsesEpochsAndRates() -> None:
    assert stages("3:0.01,2:0.001,1:0.0001") == ((3, 0.01), (2, 0.001), (1, 0.0001))
    with pytest.raises(ValueError):
        stages("3")


def _row(seed: int, correct: np.ndarray, ratio: float = 0.5) -> dict:
    from cifar_train import pack

    return {"seed": seed, "ratio": ratio, "correct": pack(correct)}


def test_netDrops_pairsControlAndArmBySeed() -> None:
    from cifar_report import control_pairs, net_drops

    rng = np.random.default_rng(0)
    n = 2000
    control = {s: rng.random(n) < 0.7 for s in range(3)}
    # seed s loses exactly 40 + 20 s images its own control got right, nothing else moves
    arm = {}
    for s, c in control.items():
        a = c.copy()
        a[np.flatnonzero(c)[: 40 + 20 * s]] = False
        arm[s] = a
    grid = arms(parse_args(["--work", "/nonexistent"]))
    pairs = control_pairs(grid)
    long = next(a for a in pairs if a.startswith("answer, long"))
    assert pairs[long].startswith("control: unpruned, 6 epochs")
    study = {
        "base": {"test_images": n},
        "runs": {
            long: [_row(s, arm[s]) for s in arm],
            pairs[long]: [_row(s, control[s], 0.0) for s in control],
        },
    }
    (got,) = net_drops(study, {long: pairs[long]})[long]
    per_seed = np.array([40, 60, 80]) / n
    assert got["n"] == 3
    assert got["drop"]["mean"] == pytest.approx(per_seed.mean())
    # half-width: the per-image difference of the seeds' means (z sd / sqrt N) in quadrature
    # with the per-seed differences (t(2) sd / sqrt 3): each seed against its own control
    d = np.mean([control[s] for s in control], axis=0) - np.mean([arm[s] for s in arm], axis=0)
    images = 1.959964 * d.std() / np.sqrt(n)
    seeds = 4.303 * per_seed.std(ddof=1) / np.sqrt(3)
    assert got["drop"]["high"] - got["drop"]["mean"] == pytest.approx(
        np.hypot(images, seeds), rel=1e-4
    )
    # a seed the control lacks is left out rather than paired with another seed's control
    study["runs"][pairs[long]] = study["runs"][pairs[long]][:2]
    (two,) = net_drops(study, {long: pairs[long]})[long]
    assert two["n"] == 2
    assert two["drop"]["mean"] == pytest.approx(per_seed[:2].mean())


def test_answers_stateTheFiftyPercentDropWithItsInterval_evenWhenNoRatioMeetsTheGoal() -> None:
    from cifar_report import answers

    def row(ratio: float, mean: float, low: float, high: float) -> dict:
        return {"ratio": ratio, "n": 3, "drop": {"mean": mean, "low": low, "high": high}}

    agg = {
        "met at 30%": [row(0.3, 0.001, -0.002, 0.004), row(0.5, 0.02, 0.01, 0.03)],
        "never met": [row(0.3, 0.02, 0.01, 0.03), row(0.7, 0.09, 0.08, 0.1)],
    }
    lines = answers(agg).splitlines()
    assert lines[2] == (
        "| met at 30% | **30%** | 0.10 [-0.20, 0.40], n = 3 | 2.00 [1.00, 3.00], n = 3 |"
    )
    assert lines[3] == "| never met | none of 30%, 70% | |  |"
