"""Fuzz: random small functional graphs planned, applied and checked on dead channels.

Each case stacks random steps (layers and keras.ops the registry supports)
on a small image model: plan at a random ratio and criterion, zero the
producers of the removed channels, apply, and the pruned model must
reproduce the original's outputs (unless a note says it cannot, as for a
LayerNormalization over the channels). ``make_plan`` and ``apply_plan`` may
only raise a ``SecateurError``; anything else is a bug. The seed is fixed
and the run stops at a time cap (``SECATEUR_FUZZ_SECONDS``, default 15 in the
default suite; ``SECATEUR_FUZZ_SEED`` draws other graphs). A slow variant runs
60 s more on the next seed's graphs (``make test-slow``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest

from secateur.pruner import PruneSpec, make_plan
from secateur.pruner.errors import SecateurError

from .block_models import randomize_every_weight
from .keep_sets import assert_applies_exactly

L = keras.layers
ops = keras.ops
SEED = int(os.environ.get("SECATEUR_FUZZ_SEED", "20240601"))
SECONDS = float(os.environ.get("SECATEUR_FUZZ_SECONDS", "15"))
SLOW_SECONDS = 60.0
MIN_CASES = 10
SIDE = 6


def _width(rng: np.random.Generator) -> int:
    return int(rng.choice([4, 6, 8, 12]))


def _same_width(x: Any, y: Any, rng: np.random.Generator) -> tuple[Any, Any]:
    if y.shape[-1] != x.shape[-1]:
        y = L.Conv2D(x.shape[-1], 1)(y)
    return x, y


# Each step takes the live tensors (all (B, SIDE, SIDE, c)) and returns a new one.
Step = Callable[[list[Any], np.random.Generator], Any]


def _pick(xs: list[Any], rng: np.random.Generator) -> Any:
    return xs[int(rng.integers(len(xs)))]


STEPS: dict[str, Step] = {
    "conv": lambda xs, r: L.Conv2D(_width(r), int(r.choice([1, 3])), padding="same")(_pick(xs, r)),
    "conv_nobias": lambda xs, r: L.Conv2D(_width(r), 1, use_bias=False)(_pick(xs, r)),
    "depthwise": lambda xs, r: L.DepthwiseConv2D(3, padding="same")(_pick(xs, r)),
    "depthwise_x2": lambda xs, r: L.DepthwiseConv2D(1, depth_multiplier=2)(_pick(xs, r)),
    "separable": lambda xs, r: L.SeparableConv2D(_width(r), 3, padding="same")(_pick(xs, r)),
    "grouped": lambda xs, r: L.Conv2D(8, 3, padding="same", groups=2)(L.Conv2D(4, 1)(_pick(xs, r))),
    "dense": lambda xs, r: L.Dense(_width(r))(_pick(xs, r)),
    "bn": lambda xs, r: L.BatchNormalization()(_pick(xs, r)),
    "ln": lambda xs, r: L.LayerNormalization()(_pick(xs, r)),
    "group_norm": lambda xs, r: L.GroupNormalization(2)(L.Conv2D(8, 1)(_pick(xs, r))),
    "relu": lambda xs, r: L.ReLU()(_pick(xs, r)),
    "activation": lambda xs, r: L.Activation(str(r.choice(["swish", "tanh", "sigmoid", "gelu"])))(
        _pick(xs, r)
    ),
    "ops_unary": lambda xs, r: getattr(ops, str(r.choice(["relu", "silu", "sigmoid", "abs"])))(
        _pick(xs, r)
    ),
    "ops_scalar": lambda xs, r: _pick(xs, r) * 0.5 + 1.0,
    "ops_square": lambda xs, r: _pick(xs, r) ** 2,
    "add": lambda xs, r: L.Add()(list(_same_width(_pick(xs, r), _pick(xs, r), r))),
    "multiply": lambda xs, r: L.Multiply()(list(_same_width(_pick(xs, r), _pick(xs, r), r))),
    "ops_add": lambda xs, r: ops.add(*_same_width(_pick(xs, r), _pick(xs, r), r)),
    "concat": lambda xs, r: L.Concatenate()([_pick(xs, r), _pick(xs, r)]),
    "ops_concat": lambda xs, r: ops.concatenate([_pick(xs, r), _pick(xs, r)], axis=-1),
    "ops_split": lambda xs, r: ops.split(L.Conv2D(8, 1)(_pick(xs, r)), 2, axis=-1)[
        int(r.integers(2))
    ],
    "maxpool": lambda xs, r: L.MaxPooling2D(3, strides=1, padding="same")(_pick(xs, r)),
    "avgpool": lambda xs, r: L.AveragePooling2D(3, strides=1, padding="same")(_pick(xs, r)),
    "pad_crop": lambda xs, r: L.Cropping2D(1)(L.ZeroPadding2D(1)(_pick(xs, r))),
    "up_pool": lambda xs, r: L.MaxPooling2D(2)(L.UpSampling2D(2)(_pick(xs, r))),
    "reshape": lambda xs, r: _tokens_and_back(_pick(xs, r)),
    "squeeze_excite": lambda xs, r: _se(_pick(xs, r)),
    "dropout": lambda xs, r: L.Dropout(0.2)(_pick(xs, r)),
    "ops_mean_space": lambda xs, r: _gate_by_mean(_pick(xs, r), (1, 2)),
    "ops_mean_channels": lambda xs, r: _gate_by_mean(_pick(xs, r), -1),
}


def _tokens_and_back(x: Any) -> Any:
    return L.Reshape((SIDE, SIDE, -1))(L.Reshape((SIDE * SIDE, x.shape[-1]))(x))


def _gate_by_mean(x: Any, axis: Any) -> Any:
    return x * ops.sigmoid(ops.mean(x, axis=axis, keepdims=True))


def _se(x: Any) -> Any:
    s = L.GlobalAveragePooling2D(keepdims=True)(x)
    s = L.Conv2D(4, 1, activation="relu")(s)
    return L.Multiply()([x, L.Conv2D(x.shape[-1], 1, activation="sigmoid")(s)])


def random_model(rng: np.random.Generator) -> tuple[keras.Model, list[str]]:
    """A random graph of 3-8 steps and the step kinds it used."""
    inp = keras.Input((SIDE, SIDE, 3))
    xs = [L.Conv2D(_width(rng), 1)(inp)]
    used = []
    names = sorted(STEPS)
    for _ in range(int(rng.integers(3, 9))):
        kind = names[int(rng.integers(len(names)))]
        xs.append(STEPS[kind](xs, rng))
        used.append(kind)
    x = L.GlobalAveragePooling2D()(L.Conv2D(6, 1)(xs[-1]))
    return keras.Model(inp, L.Dense(3)(x)), used


def _classes(model: keras.Model) -> set[str]:
    """The layer and keras.ops classes of ``model``'s graph."""
    return {type(op).__name__ for op in model.operations if not isinstance(op, L.InputLayer)}


def _run_case(rng: np.random.Generator) -> tuple[set[str], bool]:
    model, used = random_model(rng)
    used = [*used, *_classes(model)]
    randomize_every_weight(model, seed=int(rng.integers(1 << 30)))
    spec = PruneSpec(
        ratio=float(rng.uniform(0.2, 0.6)),
        criterion=str(rng.choice(["l1", "random", "bn_scale"])),
        seed=int(rng.integers(100)),
    )
    try:
        plan = make_plan(model, spec)
        x = np.random.default_rng(0).normal(size=(2, SIDE, SIDE, 3)).astype("float32")
        assert_applies_exactly(model, plan, x)
    except SecateurError:
        return set(used), False
    except AssertionError as exc:
        raise AssertionError(f"inexact for steps {used}: {exc}") from exc
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__} for steps {used}: {exc}") from exc
    return set(used), plan.removed_channels > 0


def test_randomGraphs_planApplyExactOnDeadChannels_onlyTypedErrors() -> None:
    _fuzz(SEED, SECONDS)


@pytest.mark.slow
def test_randomGraphs_moreGraphs_planApplyExactOnDeadChannels_onlyTypedErrors() -> None:
    _fuzz(SEED + 1, SLOW_SECONDS)


def _fuzz(seed: int, seconds: float) -> None:
    rng = np.random.default_rng(seed)
    kinds: set[str] = set()  # step kinds and the layer/op classes they made
    cases = pruned = 0
    start = time.monotonic()
    while cases < MIN_CASES or time.monotonic() - start < seconds:
        used, did_prune = _run_case(rng)
        kinds |= used
        cases += 1
        pruned += did_prune
        keras.backend.clear_session()
    steps, classes = kinds & set(STEPS), kinds - set(STEPS)
    print(
        f"random graphs: {cases} cases ({pruned} pruned), {len(steps)} step kinds, "
        f"{len(classes)} layer/op classes"
    )
    assert pruned >= cases // 2
    assert len(steps) >= min(len(STEPS), cases) // 2
