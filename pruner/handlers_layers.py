"""Handlers for more layer classes.

EinsumDense (equations that contract the channels and produce new ones)
and, through :mod:`handlers_hub`, keras-hub's layers and blocks. Custom
per-channel layers are recognised by what they compute (:mod:`probes`).

Registers on import; :mod:`secateur.pruner.tracing` imports this module.
"""

from __future__ import annotations

import re

from secateur.pruner import handlers_hub  # noqa: F401  (keras-hub, once loaded)
from secateur.pruner._keras import keras
from secateur.pruner.handlers import Call, Unsupported, _prod, register_handler
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
