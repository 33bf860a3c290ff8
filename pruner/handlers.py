"""The registry of supported layers and what each does to channels.

Handlers are looked up by the layer's *exact* class: a subclass may override
``call`` with anything, so it is treated as unknown until registered itself
or a probe (:func:`register_probe`, see :mod:`probes`) shows that it
computes what its base does.
Unknown layers freeze every space they touch and report themselves; a model
is never pruned on a guess. Third parties extend the registry with
:func:`register_handler`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from secateur.pruner._keras import keras
from secateur.pruner.graph import ChannelGraph, ConfigEdit, FlopTerm, WeightAxis
from secateur.pruner.layout import Inner, Layout, Rep

L = keras.layers


class Unsupported(Exception):
    """Raised by a handler for a configuration it cannot prune safely."""


@dataclass
class Call:
    """One call of a layer in the graph, as handlers see it."""

    graph: ChannelGraph
    layer: Any
    path: str
    inputs: list[Layout]
    in_shapes: list[tuple[Any, ...]]
    out_shapes: list[tuple[Any, ...]]
    node: Any

    @property
    def x(self) -> Layout:
        return self.inputs[0]

    @property
    def rank(self) -> int:
        return len(self.out_shapes[0])

    def produce(self, size: int, key: str = "out") -> Layout:
        """The new channel space this layer creates (same for every call)."""
        return self.graph.memo_space(self.path, key, size, self.path)

    def weight(self, attr: str, axis: int, layout: Layout, role: str) -> None:
        """Declare that ``axis`` of weight ``layer.<attr>`` follows ``layout``."""
        var = getattr(self.layer, attr, None)
        if var is None:
            return
        idx = _weight_index(self.layer, var)
        ndim = len(var.shape)
        self.graph.add_axis(WeightAxis(self.path, idx, attr, axis % ndim, layout, role))

    def edit(self, key: str, layout: Layout, kind: str = "size") -> None:
        self.graph.add_edit(ConfigEdit(self.path, key, layout, kind))

    def flops(self, attr: str, positions: int) -> None:
        var = getattr(self.layer, attr)
        idx = _weight_index(self.layer, var)
        self.graph.flops.append(FlopTerm(self.path, idx, int(positions)))

    def channels_last(self) -> None:
        fmt = getattr(self.layer, "data_format", "channels_last")
        if fmt not in (None, "channels_last"):
            raise Unsupported(f"data_format={fmt!r}; only channels_last is traced")


Handler = Callable[[Call], list[Layout]]
_REGISTRY: dict[type, Handler] = {}


def register_handler(*classes: type) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of the given exact layer classes."""

    def deco(fn: Handler) -> Handler:
        for cls in classes:
            _REGISTRY[cls] = fn
        return fn

    return deco


def on_registry_miss(hook: Callable[[], None]) -> None:
    """Run ``hook`` when a class is not found, then look again.

    Optional libraries (keras-hub) register their layers this way once the
    user has imported them, without the pruner ever importing them.
    """
    _MISS_HOOKS.append(hook)


_MISS_HOOKS: list[Callable[[], None]] = []
# Checks that recognise one unregistered layer object by what it computes.
_PROBES: list[Callable[[Any], Handler | None]] = []


def register_probe(probe: Callable[[Any], Handler | None]) -> None:
    """Ask ``probe(layer)`` for a handler when ``layer``'s class has none."""
    _PROBES.append(probe)


def handler_for(layer: Any) -> Handler | None:
    """The handler registered for ``layer``'s exact class, if any.

    Failing that, the first handler a probe (:func:`register_probe`) gives
    for this very layer object.
    """
    handler = _REGISTRY.get(type(layer))
    if handler is None and _MISS_HOOKS:
        for hook in _MISS_HOOKS:
            hook()
        handler = _REGISTRY.get(type(layer))
    for probe in _PROBES if handler is None else ():
        handler = probe(layer)
        if handler is not None:
            break
    return handler


def supported_layers() -> list[str]:
    """Names of every registered layer/operation class."""
    return sorted(f"{c.__module__}.{c.__name__}" for c in _REGISTRY)


def _weight_index(layer: Any, var: Any) -> int:
    for i, w in enumerate(layer.weights):
        if w is var:
            return i
    raise LookupError(f"weight {var.name} not found in layer {layer.name}")


def _prod(dims: Any) -> int:
    # An unknown dimension (a dynamic sequence length) counts as one position.
    return int(np.prod([int(d) for d in dims if d is not None])) if len(dims) else 1


# -- producers -------------------------------------------------------------


@register_handler(L.Conv1D, L.Conv2D, L.Conv3D)
def _conv(c: Call) -> list[Layout]:
    c.channels_last()
    groups = int(c.layer.groups)
    if groups != 1:
        if groups == c.in_shapes[0][-1] == c.layer.filters:
            # A depthwise conv written as a grouped Conv (ConvNeXt): output
            # channel i reads input channel i only, so channels pass through.
            c.weight("kernel", -1, c.x, "depthwise")
            c.weight("bias", 0, c.x, "bias")
            c.edit("filters", c.x)
            c.edit("groups", c.x)
            c.flops("kernel", _prod(c.out_shapes[0][1:-1]))
            return [c.x]
        raise Unsupported(f"grouped convolution (groups={groups})")
    out = c.produce(c.layer.filters)
    c.weight("kernel", -1, out, "out")
    c.weight("kernel", -2, c.x, "in")
    c.weight("bias", 0, out, "bias")
    c.edit("filters", out)
    c.flops("kernel", _prod(c.out_shapes[0][1:-1]))
    return [out]


@register_handler(L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
def _conv_transpose(c: Call) -> list[Layout]:
    c.channels_last()
    out = c.produce(c.layer.filters)
    c.weight("kernel", -2, out, "out")
    c.weight("kernel", -1, c.x, "in")
    c.weight("bias", 0, out, "bias")
    c.edit("filters", out)
    c.flops("kernel", _prod(c.in_shapes[0][1:-1]))
    return [out]


@register_handler(L.DepthwiseConv1D, L.DepthwiseConv2D)
def _depthwise(c: Call) -> list[Layout]:
    c.channels_last()
    dm = int(c.layer.depth_multiplier)
    out = c.x if dm == 1 else (Inner(c.x, dm),)
    c.weight("kernel", -2, c.x, "depthwise")
    c.weight("bias", 0, out, "bias")
    c.flops("kernel", _prod(c.out_shapes[0][1:-1]))
    return [out]


@register_handler(L.SeparableConv1D, L.SeparableConv2D)
def _separable(c: Call) -> list[Layout]:
    c.channels_last()
    dm = int(c.layer.depth_multiplier)
    mid = c.x if dm == 1 else (Inner(c.x, dm),)
    out = c.produce(c.layer.filters)
    c.weight("depthwise_kernel", -2, c.x, "depthwise")
    c.weight("pointwise_kernel", -2, mid, "in")
    c.weight("pointwise_kernel", -1, out, "out")
    c.weight("bias", 0, out, "bias")
    c.edit("filters", out)
    positions = _prod(c.out_shapes[0][1:-1])
    c.flops("depthwise_kernel", positions)
    c.flops("pointwise_kernel", positions)
    return [out]


@register_handler(L.Dense)
def _dense(c: Call) -> list[Layout]:
    if getattr(c.layer, "lora_enabled", False):
        raise Unsupported("LoRA-enabled Dense")
    out = c.produce(c.layer.units)
    c.weight("kernel", -1, out, "out")
    c.weight("kernel", 0, c.x, "in")
    c.weight("bias", 0, out, "bias")
    c.edit("units", out)
    c.flops("kernel", _prod(c.out_shapes[0][1:-1]))
    return [out]


@register_handler(L.Embedding)
def _embedding(c: Call) -> list[Layout]:
    if getattr(c.layer, "lora_enabled", False):
        raise Unsupported("LoRA-enabled Embedding")
    out = c.produce(c.layer.output_dim)
    c.weight("embeddings", 1, out, "out")
    c.edit("output_dim", out)
    return [out]


# -- normalisation and per-channel scaling ---------------------------------


def _is_last(axis: Any, rank: int) -> bool:
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return any(int(a) % rank == rank - 1 for a in axes)


@register_handler(L.BatchNormalization)
def _batchnorm(c: Call) -> list[Layout]:
    axis = c.layer.axis
    if isinstance(axis, (list, tuple)) or int(axis) % c.rank != c.rank - 1:
        raise Unsupported(f"axis={axis}; only the channel axis is traced")
    c.weight("gamma", 0, c.x, "bn_gamma")
    c.weight("beta", 0, c.x, "bn_beta")
    c.weight("moving_mean", 0, c.x, "bn_stat")
    c.weight("moving_variance", 0, c.x, "bn_stat")
    return [c.x]


@register_handler(L.LayerNormalization)
def _layernorm(c: Call) -> list[Layout]:
    axes = c.layer.axis if isinstance(c.layer.axis, list) else [c.layer.axis]
    if not _is_last(axes, c.rank):
        return [c.x]
    if len(axes) != 1:
        raise Unsupported(f"normalises over axes {axes} including channels")
    c.weight("gamma", 0, c.x, "scale")
    c.weight("beta", 0, c.x, "shift")
    c.graph.note(
        c.x,
        f"'{c.path}' (LayerNormalization) normalises over channels: removing "
        "channels changes its statistics, so outputs are not exactly preserved",
    )
    return [c.x]


@register_handler(L.PReLU)
def _prelu(c: Call) -> list[Layout]:
    alpha = c.layer.alpha
    if int(alpha.shape[-1]) != 1:
        c.weight("alpha", -1, c.x, "param")
    return [c.x]


# -- shape-only layers -----------------------------------------------------


def _passthrough(c: Call) -> list[Layout]:
    c.channels_last()
    return [c.x for _ in c.out_shapes]


register_handler(
    L.ReLU,
    L.LeakyReLU,
    L.ELU,
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Identity,
    L.UnitNormalization,
    L.MaxPooling1D,
    L.MaxPooling2D,
    L.MaxPooling3D,
    L.AveragePooling1D,
    L.AveragePooling2D,
    L.AveragePooling3D,
    L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D,
    L.GlobalMaxPooling3D,
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D,
    L.ZeroPadding1D,
    L.ZeroPadding2D,
    L.ZeroPadding3D,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.UpSampling3D,
    L.RepeatVector,
    L.Resizing,
    L.CenterCrop,
    L.RandomFlip,
    L.RandomRotation,
    L.RandomZoom,
    L.RandomTranslation,
    L.RandomCrop,
)(_passthrough)

_CHANNEL_MIXING_ACTIVATIONS = {"softmax", "log_softmax"}


@register_handler(L.Activation)
def _activation(c: Call) -> list[Layout]:
    name = getattr(c.layer.activation, "__name__", str(c.layer.activation))
    if name in _CHANNEL_MIXING_ACTIVATIONS:
        raise Unsupported(f"activation '{name}' mixes channels")
    return [c.x]


@register_handler(L.Softmax)
def _softmax(c: Call) -> list[Layout]:
    if _is_last(c.layer.axis, c.rank):
        raise Unsupported("softmax over the channel axis mixes channels")
    return [c.x]


@register_handler(L.Rescaling)
def _rescaling(c: Call) -> list[Layout]:
    for value in (c.layer.scale, c.layer.offset):
        if np.size(value) != 1:
            raise Unsupported("per-channel scale/offset")
    return [c.x]


@register_handler(L.Normalization)
def _normalization(c: Call) -> list[Layout]:
    # Per-channel statistics live in the config as well as in weights; it
    # sits on model inputs, which are never pruned, so no slicing is needed.
    c.graph.freeze(c.x, f"layer '{c.path}' (Normalization) holds per-channel statistics")
    return [c.x]


@register_handler(L.Flatten)
def _flatten(c: Call) -> list[Layout]:
    c.channels_last()
    spatial = c.in_shapes[0][1:-1]
    if any(d is None for d in spatial):
        raise Unsupported("flattening unknown spatial dimensions")
    n = _prod(spatial)
    return [c.x if n == 1 and len(spatial) == 0 else (Rep(n, c.x),)]


@register_handler(L.Reshape)
def _reshape(c: Call) -> list[Layout]:
    src, dst = c.in_shapes[0][1:], c.out_shapes[0][1:]
    if not src or None in src or None in dst:
        raise Unsupported("reshape with unknown dimensions")
    if src[-1] == dst[-1]:
        c.edit("target_shape", c.x, "last_dim")
        return [c.x]
    if len(dst) == 1:
        out = (Rep(_prod(src[:-1]), c.x),)
        c.edit("target_shape", out, "flat")
        return [out]
    raise Unsupported(f"reshape {src} -> {dst} does not keep the channel axis")


@register_handler(L.Permute)
def _permute(c: Call) -> list[Layout]:
    if int(c.layer.dims[-1]) != len(c.layer.dims):
        raise Unsupported(f"permutation {c.layer.dims} moves the channel axis")
    return [c.x]


# -- merges ----------------------------------------------------------------


def _merge(c: Call) -> list[Layout]:
    out_c = c.out_shapes[0][-1]
    # Inputs of one channel broadcast over the others and constrain nothing.
    full = [lo for lo, s in zip(c.inputs, c.in_shapes) if not (s[-1] == 1 and out_c != 1)]
    if not full:
        return [c.inputs[0]]
    return [c.graph.unify(full, c.path)]


register_handler(L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)(_merge)


@register_handler(L.Concatenate)
def _concatenate(c: Call) -> list[Layout]:
    if int(c.layer.axis) % c.rank != c.rank - 1:
        return [c.graph.unify(c.inputs, c.path)]
    return [tuple(item for lo in c.inputs for item in lo)]


def _numpy_elementwise(c: Call) -> list[Layout]:
    """keras.ops arithmetic in a functional graph (``x + 3.0``, ``x * y``)."""
    for arg in c.node.arguments._flat_arguments:
        if not isinstance(arg, keras.KerasTensor) and np.size(arg) != 1:
            raise Unsupported("non-scalar constant operand")
    return _merge(c)


def _register_optional() -> None:
    """Ops and keras.applications layers that live in private modules."""
    try:
        from keras.src.ops import numpy as knp

        register_handler(knp.Add, knp.Subtract, knp.Multiply, knp.Divide, knp.TrueDivide)(
            _numpy_elementwise
        )
    except (ImportError, AttributeError):  # pragma: no cover - Keras internals moved
        pass
    try:
        from keras.src.applications.convnext import LayerScale, StochasticDepth

        register_handler(StochasticDepth)(_passthrough)

        @register_handler(LayerScale)
        def _layer_scale(c: Call) -> list[Layout]:
            c.weight("gamma", 0, c.x, "scale")
            c.edit("projection_dim", c.x)
            return [c.x]

    except ImportError:  # pragma: no cover
        pass
    try:
        from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

        register_handler(CustomScaleLayer)(_merge)
    except ImportError:  # pragma: no cover
        pass


_register_optional()
