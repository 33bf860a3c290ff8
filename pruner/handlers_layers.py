"""Handlers for more layer classes.

EinsumDense (equations that contract the channels and produce new ones),
custom layer-scale layers recognised by what they compute, and, through
:mod:`handlers_hub`, keras-hub's layers and blocks.

Registers on import; :mod:`secateur.pruner.tracing` imports this module.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import numpy as np

from secateur.pruner import handlers_hub  # noqa: F401  (keras-hub, once loaded)
from secateur.pruner._keras import keras
from secateur.pruner.handlers import Call, Unsupported, _prod, register_handler, register_probe
from secateur.pruner.layout import Layout

L = keras.layers

_EQUATION = re.compile(r"^([a-z.]+),([a-z]+)->([a-z.]+)$")


def einsum_axes(equation: str) -> tuple[int, int]:
    """Where an EinsumDense equation puts the channels.

    Supported: the input's last axis is contracted with one kernel axis and
    the output's last axis comes from another kernel axis (``"abc,cd->abd"``,
    ``"...b,bc->...c"``, ``"abc,cde->abde"``): output channel ``j`` is a
    weighted sum of input channels through kernel slice ``j``, like Dense.

    Returns:
        ``(in_axis, out_axis)``: the kernel axis that reads the input's
        channels and the one that makes the output's.

    Raises:
        Unsupported: any other equation, with the reason.
    """
    match = _EQUATION.match(equation.replace(" ", ""))
    if match is None:
        raise Unsupported(f"equation {equation!r} is not of the form 'in,kernel->out'")
    src, ker, dst = match.groups()
    c, d = src[-1], dst[-1]
    if c == "." or d == ".":
        raise Unsupported(f"equation {equation!r}: the channel axis is under '...'")
    if c not in ker or c in dst:
        raise Unsupported(
            f"equation {equation!r}: the input's last axis '{c}' is not contracted with the kernel"
        )
    if d not in ker or d in src:
        raise Unsupported(
            f"equation {equation!r}: the output's last axis '{d}' does not come from the kernel"
        )
    if len(set(ker)) != len(ker) or any(k not in src and k not in dst for k in ker):
        raise Unsupported(f"equation {equation!r}: kernel axes are repeated or summed away")
    return ker.index(c), ker.index(d)


@register_handler(L.EinsumDense)
def _einsum_dense(c: Call) -> list[Layout]:
    if getattr(c.layer, "lora_enabled", False):
        raise Unsupported("LoRA-enabled EinsumDense")
    in_axis, out_axis = einsum_axes(c.layer.equation)
    out = c.produce(c.out_shapes[0][-1])
    c.weight("kernel", in_axis, c.x, "in")
    c.weight("kernel", out_axis, out, "out")
    dst = c.layer.equation.split("->")[1]
    if getattr(c.layer, "bias", None) is not None:
        if dst[-1] not in (c.layer.bias_axes or ""):
            # Dead output channels would still carry a bias over other axes.
            raise Unsupported(f"bias_axes={c.layer.bias_axes!r} do not include the output channels")
        c.weight("bias", -1, out, "bias")
    c.edit("output_shape", out, "last_dim")
    c.flops("kernel", _positions(c, dst))
    return [out]


def _positions(c: Call, dst: str) -> int:
    """Output entries per example divided by the kernel's share of them."""
    total = _prod(c.out_shapes[0][1:])
    ker = c.layer.equation.split(",")[1].split("->")[0]
    for axis, letter in enumerate(ker):
        if letter in dst:
            total //= max(int(c.layer.kernel.shape[axis]), 1)
    return max(total, 1)


# -- custom per-channel scale layers ("layer scale") ---------------------------

# layer -> its handler or None, decided once per layer object.
_SCALES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _probe_scale(layer: Any) -> Any:
    """A custom layer that only multiplies each channel by its own weight.

    Model code writes layer scale as its own small class (``x * gamma``).
    Such a layer is recognised by what it computes, never by its name: no
    sub-layers, one weight of shape ``(C,)``, one config entry equal to
    ``C`` (edited with the kept count), and ``layer(x) == x * gamma`` on
    random inputs.
    """
    if not isinstance(layer, L.Layer) or type(layer).__module__.startswith("keras."):
        return None
    try:
        if layer not in _SCALES:
            _SCALES[layer] = _scale_handler(layer)
        return _SCALES[layer]
    except TypeError:  # not weak-referenceable
        return None


def _scale_handler(layer: Any) -> Any:
    weights = layer.weights
    if len(weights) != 1 or len(weights[0].shape) != 1 or layer._layers:
        return None
    var, size = weights[0], int(weights[0].shape[0])
    attr = next((k for k, v in vars(layer).items() if v is var), None)
    try:
        config = layer.get_config()
    except Exception:  # noqa: BLE001 - a layer that cannot say its config is not re-created
        return None
    keys = [k for k, v in config.items() if type(v) is int and v == size]
    if attr is None or len(keys) != 1 or not _multiplies(layer, np.asarray(var), size):
        return None
    key = keys[0]

    def handler(c: Call) -> list[Layout]:
        if c.in_shapes[0][-1] != size:
            raise Unsupported("the scale does not follow the channel axis")
        c.weight(attr, 0, c.x, "scale")
        c.edit(key, c.x)
        return [c.x]

    return handler


def _multiplies(layer: Any, gamma: np.ndarray, size: int) -> bool:
    rng = np.random.default_rng(0)
    for rank in (4, 3, 2):
        x = rng.normal(size=(2, *([3] * (rank - 2)), size)).astype("float32")
        try:
            y = np.asarray(keras.ops.convert_to_numpy(layer(x)))
        except Exception:  # noqa: BLE001 - does not take this rank
            continue
        return y.shape == x.shape and bool(np.allclose(y, x * gamma, rtol=1e-5, atol=1e-6))
    return False


register_probe(_probe_scale)
