"""Handlers for keras-hub's layers, registered only when keras-hub is loaded.

keras-hub is not a dependency of the pruner: a model can only hold its
layers once the user has imported it, so registration waits until then
(:func:`ensure_registered`, run on a registry miss) and never imports
keras-hub itself. Its classes live in private modules that move between
releases; a class that is not found is skipped, and its layers then freeze
with the usual "not in the registry" reason.

Two kinds of support:

- *inlined* block layers (:mod:`inline`): MBConv/FusedMBConv/inverted
  residual blocks, transformer encoder blocks and the like are traced
  through their own sub-layers, so their internal widths (expanded
  channels, MLP hidden units) become prunable groups;
- *handlers* for the small layers those blocks are made of: per-channel
  scales (layer scale), drop-path, RMS normalisation over channels, and
  HGNetV2's scalar affine.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import numpy as np

from secateur.pruner.constants import Ctx, State, affine, channels, register_rule
from secateur.pruner.handlers import Call, Unsupported, on_registry_miss, register_handler
from secateur.pruner.inline import register_inline
from secateur.pruner.layout import Layout

_MODELS = "keras_hub.src.models."

# Block layers whose `call` records as a graph of their sub-layers, checked
# to reproduce the layer's outputs exactly (module under keras_hub.src.models).
INLINE: dict[str, tuple[str, ...]] = {
    "efficientnet.mbconv": ("MBConvBlock",),
    "efficientnet.fusedmbconv": ("FusedMBConvBlock",),
    "mobilenet.mobilenet_backbone": (
        "InvertedResidualBlock",
        "DepthwiseConvBlock",
        "ConvBnActBlock",
        "SqueezeAndExcite2D",
    ),
    "mobilenetv5.mobilenetv5_blocks": ("EdgeResidual", "UniversalInvertedResidual"),
    "mobilenetv5.mobilenetv5_layers": ("ConvNormAct",),
    "hgnetv2.hgnetv2_encoder": ("HGNetV2Encoder",),
    "hgnetv2.hgnetv2_layers": (
        "HGNetV2Embeddings",
        "HGNetV2Stage",
        "HGNetV2BasicLayer",
        "HGNetV2ConvLayer",
        "HGNetV2ConvLayerLight",
    ),
    "vit.vit_layers": ("ViTEncoder", "ViTEncoderBlock", "MLP"),
    "dinov2.dinov2_layers": ("DINOV2Encoder", "DINOV2Layer", "DINOV2Attention", "DINOV2MLP"),
    "dinov3.dinov3_layers": ("DINOV3Encoder", "DINOV3Layer", "DINOV3MLP"),
    "clip.clip_layers": ("CLIPEncoderLayer",),
    "deit.deit_layers": (
        "DeiTEncoder",
        "DeiTEncoderBlock",
        "DeiTIntermediate",
        "DeiTOutput",
    ),
    "mit.mit_layers": (
        "HierarchicalTransformerEncoder",
        "OverlappingPatchingAndEmbedding",
        "MixFFN",
        "SegFormerMultiheadAttention",
    ),
    "swin_transformer.swin_transformer_layers": (
        "SwinTransformerStage",
        "SwinTransformerBlock",
        "WindowAttention",
        "PatchMerging",
        "PatchEmbedding",
        "Mlp",
    ),
    "vit_det.vit_layers": (
        "ViTDetPatchingAndEmbedding",
        "WindowedTransformerEncoder",
        "MultiHeadAttentionWithRelativePE",
        "WindowPartitioning",
        "MLP",
    ),
    "deeplab_v3.deeplab_v3_layers": ("SpatialPyramidPooling",),
    "depth_anything.depth_anything_layers": (
        "DepthAnythingNeck",
        "DepthAnythingDepthEstimationHead",
        "DepthAnythingReassembleLayer",
        "DepthAnythingFeatureFusionLayer",
        "DepthAnythingPreActResidualLayer",
        "DepthAnythingTokenToImage",
    ),
    "d_fine.d_fine_hybrid_encoder": ("DFineHybridEncoder",),
    "d_fine.d_fine_encoder": ("DFineEncoder", "DFineEncoderLayer"),
    "retinanet.feature_pyramid": ("FeaturePyramid",),
}

DROP_PATH: dict[str, str] = {
    "mit.mit_layers": "DropPath",
    "swin_transformer.swin_transformer_layers": "DropPath",
    "mobilenetv5.mobilenetv5_layers": "DropPath",
    "dinov2.dinov2_layers": "DINOV2DropPath",
    "dinov3.dinov3_layers": "DINOV3DropPath",
}

_RESHAPES = "it does not inline (its call reshapes or moves the channel axis)"
_EMBEDS = "a patch embedding with class tokens and position embeddings is not traced"
# Why a layer stays opaque, for the plan report: it has no handler, and
# inlining (tried first for the classes above) failed or is not offered.
OPAQUE: dict[str, dict[str, str]] = {
    "swin_transformer.swin_transformer_layers": dict.fromkeys(
        (
            "SwinTransformerStage",
            "SwinTransformerBlock",
            "WindowAttention",
            "PatchMerging",
            "PatchEmbedding",
        ),
        _RESHAPES,
    ),
    "mit.mit_layers": dict.fromkeys(("MixFFN", "SegFormerMultiheadAttention"), _RESHAPES),
    "vit.vit_layers": {"ViTPatchingAndEmbedding": _EMBEDS},
    "vit_det.vit_layers": {
        "WindowedTransformerEncoder": _RESHAPES,
        "MultiHeadAttentionWithRelativePE": _RESHAPES,
        "AddPositionalEmbedding": "it adds position embeddings, which are not traced",
    },
    "deit.deit_layers": {"DeiTEmbeddings": _EMBEDS},
    "dinov2.dinov2_layers": {"DINOV2Embedding": _EMBEDS},
    "dinov3.dinov3_layers": {
        "DINOV3Embedding": _EMBEDS,
        "DINOV3RopePositionEmbedding": "it computes rotary position tables",
        "DINOV3Attention": "its rotary position attention is not traced",
    },
    "clip.clip_layers": {"CLIPVisionEmbedding": _EMBEDS},
}

_done = False


def ensure_registered() -> None:
    """Register keras-hub's layers once keras-hub has been imported."""
    global _done
    if _done or "keras_hub" not in sys.modules:
        return
    _done = True
    for module, names in INLINE.items():
        register_inline(*_classes(module, names))
    drop = [c for m, name in DROP_PATH.items() for c in _classes(m, (name,))]
    register_handler(*drop)(_passthrough)
    register_rule(*drop)(_same)
    scales = _classes("dinov2.dinov2_layers", ("DINOV2LayerScale",))
    scales += _classes("dinov3.dinov3_layers", ("DINOV3LayerScale",))
    register_handler(*scales)(_lambda_scale)
    register_rule(*scales)(_scale_rule("lambda1"))
    layer_scale_2d = _classes("mobilenetv5.mobilenetv5_layers", ("LayerScale2d",))
    register_handler(*layer_scale_2d)(_layer_scale_2d)
    register_rule(*layer_scale_2d)(_scale_rule("gamma"))
    register_handler(*_classes("mobilenetv5.mobilenetv5_layers", ("RmsNorm2d",)))(_rms_norm)
    affine_block = _classes("hgnetv2.hgnetv2_layers", ("HGNetV2LearnableAffineBlock",))
    register_handler(*affine_block)(_passthrough)
    register_rule(*affine_block)(_scalar_affine)
    for module, reasons in OPAQUE.items():
        for cls in _classes(module, tuple(reasons)):
            register_handler(cls)(_opaque(reasons[cls.__name__]))


def _classes(module: str, names: tuple[str, ...]) -> list[type]:
    try:
        mod = importlib.import_module(_MODELS + module)
    except ImportError:  # pragma: no cover - keras-hub reorganised
        return []
    return [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]


# -- handlers ------------------------------------------------------------------


def _passthrough(c: Call) -> list[Layout]:
    """Drop-path and scalar affine: each channel maps onto itself."""
    return [c.x]


def _opaque(reason: str) -> Any:
    def handler(c: Call) -> list[Layout]:
        raise Unsupported(
            f"keras-hub block layer: {reason}, so the channels it touches cannot be traced"
        )

    return handler


def _channels_last(c: Call) -> None:
    if getattr(c.layer, "data_format", None) == "channels_first":
        raise Unsupported("data_format='channels_first'; only channels_last is traced")


def _lambda_scale(c: Call) -> list[Layout]:
    """DINOv2/v3 layer scale: ``x * lambda1``, one factor per channel."""
    c.weight("lambda1", 0, c.x, "scale")
    c.edit("hidden_dim", c.x)
    return [c.x]


def _layer_scale_2d(c: Call) -> list[Layout]:
    """MobileNetV5 layer scale: ``x * gamma``, one factor per channel."""
    _channels_last(c)
    c.weight("gamma", 0, c.x, "scale")
    c.edit("dim", c.x)
    return [c.x]


def _rms_norm(c: Call) -> list[Layout]:
    """RMS normalisation over the channels, then a per-channel scale."""
    _channels_last(c)
    c.weight("gamma", 0, c.x, "scale")
    c.edit("dim", c.x)
    c.graph.note(
        c.x,
        f"'{c.path}' (RmsNorm2d) normalises over channels: removing channels "
        "changes its statistics, so outputs are not exactly preserved",
    )
    return [c.x]


# -- constant rules (bias compensation) ------------------------------------------


def _same(ctx: Ctx) -> list[State] | None:
    return [ctx.x]


def _scale_rule(attr: str) -> Any:
    def rule(ctx: Ctx) -> list[State] | None:
        gamma = ctx.value(attr)
        if gamma is None or len(gamma) != len(ctx.x.mean):
            return None
        return [affine(ctx.x, gamma.astype(np.float64), 0.0)]

    return rule


def _scalar_affine(ctx: Ctx) -> list[State] | None:
    scale, bias = ctx.value("scale"), ctx.value("bias")
    if scale is None or bias is None or channels(ctx.node.outputs[0]) != len(ctx.x.mean):
        return None
    return [affine(ctx.x, float(np.ravel(scale)[0]), float(np.ravel(bias)[0]))]


on_registry_miss(ensure_registered)
ensure_registered()
