"""Recognise layers the registry does not list by what they compute.

Model code writes small per-channel layers as its own classes (a layer
scale ``x * gamma``, an affine ``x * w + b``, a bias ``x + b``, a scalar
gain) and subclasses Keras layers (a ``Conv2D`` with standardised weights).
The registry looks classes up exactly, so each is unknown and freezes what
it touches. Two probes (:func:`secateur.pruner.handlers.register_probe`)
recognise the safe ones, never by name:

- a *per-channel* layer: no sub-layers, only 1-D weights of the input's
  width (or of one entry), the output the input's shape, and the check that
  decides it: the layer re-created from its config for a random subset of
  the channels (its config entry equal to the width edited, weights sliced)
  computes exactly those channels of the original's output. That is what
  surgery does with it, so a plan through it is exact. A zero channel
  whose own weights are zero must also output zero: a constant the layer
  adds by itself (``x * g + 1``) would reach the next layer unfolded.
- a *subclass* of a registered Keras layer that computes what its base
  computes (same config, same weights, random inputs): it gets the base's
  handler. One that computes something else (weight standardisation) stays
  unknown, and the reason names the base class it departs from.

Each verdict is taken once per layer object and input width.

Registers on import; :mod:`secateur.pruner.tracing` imports this module.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from secateur.pruner._keras import keras
from secateur.pruner.handlers import _REGISTRY, Call, Handler, Unsupported, register_probe
from secateur.pruner.layout import Layout

L = keras.layers
RTOL, ATOL = 1e-5, 1e-6

# layer -> {input width or "base": its verdict (see _verdict, _same_as_base)}.
_VERDICTS: weakref.WeakKeyDictionary[Any, dict[int | str, Any]] = weakref.WeakKeyDictionary()


def _is_custom(layer: Any) -> bool:
    return isinstance(layer, L.Layer) and not type(layer).__module__.startswith("keras.")


# -- per-channel layers ----------------------------------------------------------


def _probe_channelwise(layer: Any) -> Handler | None:
    """A handler for a custom layer made of 1-D per-channel weights, else None."""
    if not _is_custom(layer) or layer._layers or not layer.weights:
        return None
    if any(len(w.shape) != 1 for w in layer.weights):
        return None
    attrs = {id(v): k for k, v in vars(layer).items() if isinstance(v, keras.Variable)}
    if any(id(w) not in attrs for w in layer.weights):
        return None  # a weight the handler could not name
    try:
        _VERDICTS.setdefault(layer, {})
    except TypeError:  # not weak-referenceable
        return None
    return _channelwise_handler


def _channelwise_handler(c: Call) -> list[Layout]:
    width = c.in_shapes[0][-1] if len(c.in_shapes) == 1 and c.in_shapes[0] else None
    if width is None or len(c.out_shapes) != 1:
        raise Unsupported("layer class is not in the registry")
    verdicts = _VERDICTS.setdefault(c.layer, {})
    if int(width) not in verdicts:
        verdicts[int(width)] = _verdict(c.layer, c.in_shapes[0])
    found = verdicts[int(width)]
    if found is None:
        raise Unsupported(
            "layer class is not in the registry, and it does not compute each channel from "
            "that channel alone with its own weights"
        )
    roles, keys = found
    for attr, role in roles:
        c.weight(attr, 0, c.x, role)
    for key in keys:
        c.edit(key, c.x)
    return [c.x]


def _verdict(layer: Any, shape: tuple[Any, ...]) -> tuple[list[tuple[str, str]], list[str]] | None:
    """Weight roles and edited config keys when ``layer`` is per-channel at this width."""
    width = int(shape[-1])
    weights = [np.asarray(w.numpy()) for w in layer.weights]
    if any(w.shape[0] not in (1, width) for w in weights) or not all(
        np.issubdtype(w.dtype, np.floating) for w in weights
    ):
        return None
    try:
        config = layer.get_config()
    except Exception:  # noqa: BLE001 - a layer that cannot say its config is not re-created
        return None
    keys = [k for k, v in config.items() if type(v) is int and v == width and width > 1]
    rng = np.random.default_rng(0)
    dims = [2, *(min(int(d or 3), 4) for d in shape[1:-1]), width]
    x = rng.normal(size=dims).astype("float32")
    keep = np.sort(rng.choice(width, max(1, width // 2), replace=False))
    try:
        y = np.asarray(keras.ops.convert_to_numpy(layer(x)))
        small = type(layer).from_config({**config, **{k: len(keep) for k in keys}})
        small.build((None, *dims[1:-1], len(keep)))
        small.set_weights([w[keep] if w.shape[0] == width > 1 else w for w in weights])
        got = np.asarray(keras.ops.convert_to_numpy(small(x[..., keep])))
    except Exception:  # noqa: BLE001 - any failure: not recognised
        return None
    if y.shape != x.shape or not np.allclose(got, y[..., keep], rtol=RTOL, atol=ATOL):
        return None
    if not _dead_stays_dead(layer, weights, dims):
        return None
    return _roles(layer, weights, dims), keys


def _dead_stays_dead(layer: Any, weights: list[np.ndarray], dims: list[int]) -> bool:
    """A zero channel with its own weights at zero outputs zero (no hidden constant).

    ``x * g + 1.0`` fails: a removed channel's constant could not be folded
    into the next layer, since no constant rule knows the class.
    """
    zero = np.zeros(dims, dtype="float32")
    try:
        for var, w in zip(layer.weights, weights):
            if w.shape[0] == dims[-1] > 1:
                var.assign(np.zeros_like(w))
        out = np.asarray(keras.ops.convert_to_numpy(layer(zero)))
    except Exception:  # noqa: BLE001 - any failure: not recognised
        return False
    finally:
        for var, w in zip(layer.weights, weights):
            var.assign(w)
    return not np.any(out)


def _roles(layer: Any, weights: list[np.ndarray], dims: list[int]) -> list[tuple[str, str]]:
    """Per-channel weights: ``"shift"`` if a zero input's output depends on it, else ``"scale"``.

    Weights of one entry act on every channel alike and follow no channel.
    """
    attrs = {id(v): k for k, v in vars(layer).items() if isinstance(v, keras.Variable)}
    zero = np.zeros(dims, dtype="float32")
    base = np.asarray(keras.ops.convert_to_numpy(layer(zero)))
    roles = []
    for i, var in enumerate(layer.weights):
        if weights[i].shape[0] != dims[-1] or dims[-1] == 1:
            continue
        try:
            var.assign(weights[i] + 1.0)
            moved = np.asarray(keras.ops.convert_to_numpy(layer(zero)))
        finally:
            var.assign(weights[i])
        roles.append((attrs[id(var)], "scale" if np.allclose(moved, base) else "shift"))
    return roles


# -- subclasses of registered Keras layers ------------------------------------------


def _probe_subclass(layer: Any) -> Handler | None:
    """The base class's handler when ``layer`` computes exactly what its base does."""
    base = registered_base(layer)
    if base is None:
        return None
    try:
        verdicts = _VERDICTS.setdefault(layer, {})
    except TypeError:
        return None
    if "base" not in verdicts:
        verdicts["base"] = _same_as_base(layer, base)
    return _REGISTRY[base] if verdicts["base"] else None


def registered_base(layer: Any) -> type | None:
    """The nearest Keras class in the registry that ``layer``'s class derives from."""
    if not _is_custom(layer):
        return None
    for cls in type(layer).__mro__[1:]:
        if cls in _REGISTRY and cls.__module__.startswith("keras."):
            return cls
    return None


def _same_as_base(layer: Any, base: Any) -> bool:
    shape = getattr(layer, "_build_shapes_dict", None) or {}
    inputs = list(shape.values())
    if len(inputs) != 1 or inputs[0] is None:
        return False
    dims = [2, *(min(int(d or 5), 8) for d in tuple(inputs[0])[1:])]
    try:
        twin = base.from_config(layer.get_config())
        twin.build((None, *dims[1:]))
        twin.set_weights(layer.get_weights())
        x = np.random.default_rng(0).normal(size=dims).astype("float32")
        want = np.asarray(keras.ops.convert_to_numpy(layer(x)))
        got = np.asarray(keras.ops.convert_to_numpy(twin(x)))
    except Exception:  # noqa: BLE001 - any failure: not the base's computation
        return False
    return want.shape == got.shape and bool(np.allclose(want, got, rtol=RTOL, atol=ATOL))


def unknown_reason(layer: Any) -> str:
    """Why a layer without a handler is frozen, naming the Keras class it derives from."""
    base = registered_base(layer)
    if base is None:
        return "layer class is not in the registry"
    return (
        f"layer class is not in the registry (a subclass of {base.__name__} that does not "
        f"compute what {base.__name__} computes)"
    )


register_probe(_probe_subclass)
register_probe(_probe_channelwise)
