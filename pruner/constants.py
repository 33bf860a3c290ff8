"""Which channels carry a constant, and where that constant is consumed.

A removed channel is not always silent: a filter and bias of zero followed
by ``sigmoid`` outputs 0.5 everywhere, a BatchNorm with gamma 0 outputs its
beta. :func:`constant_tracing.trace_constants` walks the model once and
gives every tensor a per-channel :class:`State`: a mean, a spread and whether
the value is known without data.

- *Exact* constants (spread 0) come from producers whose filter is zero
  (the output is the bias) and BatchNorms whose gamma is zero (beta).
- *Approximate* ones come from every other BatchNorm at inference: its
  normalised input is about N(0, 1), so the channel is about
  N(beta, gamma^2), which is nearly constant when gamma is small. Activations
  are then evaluated in expectation by Gauss-Hermite quadrature (the
  data-free estimate of Nagel et al. 2019, "Data-Free Quantization").

Per-channel layers (activations, BatchNorm, pooling, dropout, flatten,
scalar arithmetic, merges of known values) carry states along; anything else
makes them unknown. Where an exact non-zero constant cannot be carried, the
tensor is recorded as a :class:`Loss`; where a Conv or Dense reads known
values, as a :class:`Feed` that :mod:`secateur.pruner.compensation` folds
into its bias.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secateur.pruner._keras import keras
from secateur.pruner.graph import ChannelGraph
from secateur.pruner.layout import Layout

WeightGetter = Callable[[str, int], np.ndarray]

# Probabilists' Gauss-Hermite rule: E[f(Z)], Z ~ N(0, 1), as sum(W * f(Z_i)).
_Z, _W = np.polynomial.hermite_e.hermegauss(9)
_W = _W / _W.sum()
_MIXING = {"softmax", "log_softmax"}


@dataclass
class State:
    """What is known, without data, about each channel of a tensor."""

    mean: np.ndarray
    std: np.ndarray
    known: np.ndarray

    @classmethod
    def unknown(cls, n: int) -> State:
        return cls(np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool))

    @classmethod
    def exact(cls, values: np.ndarray, known: np.ndarray) -> State:
        values = np.asarray(values, dtype=np.float64)
        return cls(np.where(known, values, 0.0), np.zeros(len(values)), known.copy())

    @property
    def is_exact(self) -> np.ndarray:
        return self.known & (self.std == 0)

    @property
    def live_constant(self) -> np.ndarray:
        """Exact constants that are not zero: dropping them changes outputs."""
        return self.is_exact & (self.mean != 0)


@dataclass(frozen=True)
class Feed:
    """One call of a Conv/Dense whose input carries known values.

    ``taps`` weighs each kernel tap by the share of output positions where
    it reads inside the input (1 everywhere for valid padding); ``edge``
    marks taps that read zero padding somewhere, where a per-channel
    constant does not reach every output position alike.
    """

    path: str
    layout: Layout
    state: State
    taps: np.ndarray
    edge: np.ndarray


@dataclass(frozen=True)
class Loss:
    """A layer that cannot carry the exact non-zero constants it receives."""

    path: str
    cls: str
    layout: Layout
    mask: np.ndarray


@dataclass
class ConstantTrace:
    feeds: list[Feed] = field(default_factory=list)
    losses: list[Loss] = field(default_factory=list)


@dataclass
class Ctx:
    """One call of a layer, as the propagation rules see it."""

    trace: ConstantTrace
    graph: ChannelGraph
    weights: WeightGetter
    layer: Any
    path: str
    node: Any
    ins: list[State]

    @property
    def x(self) -> State:
        return self.ins[0]

    def value(self, attr: str) -> np.ndarray | None:
        var = getattr(self.layer, attr, None)
        if var is None:
            return None
        return self.weights(self.path, self._weight_index[id(var)])

    @functools.cached_property
    def _weight_index(self) -> dict[int, int]:
        # ``layer.weights`` builds a new list on every access.
        return {id(w): i for i, w in enumerate(self.layer.weights)}

    def array(self, attr: str) -> np.ndarray:
        """A weight the layer always has (``kernel``, ``moving_mean``)."""
        value = self.value(attr)
        if value is None:
            raise LookupError(f"layer '{self.path}' has no weight '{attr}'")
        return value

    def shape(self, i: int = 0, out: bool = False) -> tuple[Any, ...]:
        tensors = self.node.outputs if out else self.node.input_tensors
        return tuple(tensors[i].shape)

    def lose(self, i: int, mask: np.ndarray) -> None:
        """Record that input ``i``'s channels in ``mask`` are dropped here."""
        layout = self.graph.tensor_layouts.get(id(self.node.input_tensors[i]))
        if layout is not None and mask.any():
            self.trace.losses.append(Loss(self.path, type(self.layer).__name__, layout, mask))


Rule = Callable[[Ctx], list[State] | None]
_RULES: dict[type, Rule] = {}


def register_rule(*classes: type) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the propagation rule of the given exact layer classes."""

    def deco(fn: Rule) -> Rule:
        for cls in classes:
            _RULES[cls] = fn
        return fn

    return deco


def rule_for(layer: Any) -> Rule | None:
    """The propagation rule registered for ``layer``'s exact class, if any."""
    return _RULES.get(type(layer))


def channels(tensor: Any) -> int:
    shape = tuple(tensor.shape)
    return int(shape[-1]) if len(shape) >= 2 and shape[-1] is not None else 1


# -- elementwise maths -------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# The commonest activations in numpy: a Keras call per layer was most of the
# walk's time. Anything else is evaluated by Keras itself.
_NUMPY_ACTIVATIONS: dict[Any, Callable[[np.ndarray], np.ndarray]] = {
    keras.activations.relu: lambda x: np.maximum(x, 0.0),
    keras.activations.sigmoid: _sigmoid,
    keras.activations.silu: lambda x: x * _sigmoid(x),
    keras.activations.tanh: np.tanh,
}


def _numpy_form(fn: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    if type(fn) is keras.layers.ReLU and not fn.negative_slope and not fn.threshold:
        top = np.inf if fn.max_value is None else float(fn.max_value)
        return lambda x: np.clip(x, 0.0, top)
    try:
        return _NUMPY_ACTIVATIONS.get(fn)
    except TypeError:  # an unhashable callable
        return None


def _evaluate(fn: Callable[[Any], Any], points: np.ndarray) -> np.ndarray:
    form = _numpy_form(fn)
    if form is not None:
        return form(points)
    out = fn(keras.ops.convert_to_tensor(points.astype("float32")))
    return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float64)


def elementwise(fn: Callable[[Any], Any], st: State) -> State:
    """``fn`` applied to each channel: exactly for constants, else in expectation."""
    if not st.known.any():
        return st
    points = st.mean[None, :] + st.std[None, :] * _Z[:, None]
    values = _evaluate(fn, points)
    mean = _W @ values
    std = np.sqrt(np.maximum(_W @ np.square(values - mean), 0.0))
    exact = st.std == 0
    return State(
        np.where(exact, values[0], mean), np.where(exact, 0.0, std), st.known & np.isfinite(mean)
    )


def activation(layer: Any, st: State) -> State | None:
    fn = getattr(layer, "activation", None)
    name = getattr(fn, "__name__", "")
    if fn is None or name == "linear":
        return st
    if name in _MIXING:
        return None
    return elementwise(fn, st)


def affine(st: State, scale: np.ndarray | float, shift: np.ndarray | float) -> State:
    return State(st.mean * scale + shift, st.std * np.abs(scale), st.known.copy())
