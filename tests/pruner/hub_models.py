"""Small random-init keras-hub image backbones and the checks run on each.

Shared by ``tests/pruner/test_keras_hub.py`` and ``benchmarks/keras_hub_survey.py``
so both build the same models. No preset is downloaded: every backbone is
built from a tiny config (1-2 layers/stages, narrow widths, 32x32 or 64x64).

Included: every ``keras_hub.models.*Backbone`` whose input is an image and
whose output is image features, i.e. the standalone image encoders
(``image_shape`` argument) and the dense-prediction backbones that wrap one of
them (DeepLabV3, RetinaNet, BASNet, SegFormer, DepthAnything, D-FINE).
Excluded (see ``EXCLUDED``): models with text, prompt or video inputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import keras
import numpy as np

from secateur.pruner import PruneSpec, apply_plan, make_plan
from secateur.pruner.plan_report import frozen_reasons, prunable_share

from .conftest import kill_pruned_channels, randomize

RATIO = 0.2
EXACT_TOL = 1e-4

EXCLUDED = {
    "SAMBackbone": "prompted segmentation (points/boxes/masks inputs); its image "
    "encoder ViTDetBackbone is covered",
    "SAM3PromptableConceptBackbone": "text and geometry prompts as inputs",
    "PARSeqBackbone": "image-to-text: token ids are an input",
    "CLIPBackbone": "two towers, text input",
    "MetaCLIP2Backbone": "two towers, text input",
    "SigLIPBackbone": "two towers, text input",
    "BLIP2Backbone": "vision-language model, text input",
    "PaliGemmaBackbone": "vision-language model, text input",
    "Gemma3Backbone": "vision-language model, text input",
    "Gemma4Backbone": "vision-language model, text input",
    "FluxBackbone": "text-to-image diffusion transformer (text, ids, timestep inputs)",
    "StableDiffusion3Backbone": "text-to-image diffusion (text encoders, latent input)",
    "VideoPrismBackbone": "video and text inputs",
    "Qwen3_5Backbone": "vision-language model, text input",
    "Qwen3_5MoeBackbone": "vision-language model, text input",
    "T5Gemma2Backbone": "vision-language encoder-decoder, text input",
}


def hub() -> Any:
    """The ``keras_hub`` module, imported on first use (it is slow to import).

    Raises:
        ImportError: keras_hub is not installed (it is in the dev extra).
    """
    import keras_hub

    return keras_hub


def _m() -> Any:
    return hub().models


def _resnet(side: int | None = 32, stages: int = 2, stem: int = 16) -> Any:
    # keras-hub requires 64 filters in the first stage.
    return _m().ResNetBackbone(
        input_conv_filters=[stem],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16, 16, 16][:stages],
        stackwise_num_blocks=[1] * stages,
        stackwise_num_strides=[1, 2, 2, 2][:stages],
        block_type="bottleneck_block",
        image_shape=(side, side, 3) if side else (None, None, 3),
    )


def _mit(side: int = 32) -> Any:
    return _m().MiTBackbone(
        layerwise_depths=[1, 1],
        num_layers=2,
        layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[2, 1],
        max_drop_path_rate=0.0,
        layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2],
        image_shape=(side, side, 3),
        hidden_dims=[8, 16],
    )


def _dinov2(side: int = 28) -> Any:
    return _m().DINOV2Backbone(
        patch_size=14,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(side, side, 3),
        position_embedding_shape=(28, 28),
    )


def _hgnetv2(features: list[str] | None = None) -> Any:
    return _m().HGNetV2Backbone(
        depths=[1, 1],
        embedding_size=8,
        hidden_sizes=[16, 32],
        stem_channels=[3, 8, 8],
        hidden_act="relu",
        use_learnable_affine_block=True,
        stackwise_stage_filters=[(8, 8, 16, 1, 2, 3), (16, 8, 32, 1, 2, 3)],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, True],
        image_shape=(64, 64, 3),
        out_features=features,
    )


def _mobilenet() -> Any:
    return _m().MobileNetBackbone(
        stackwise_expansion=[[16, 24], [32]],
        stackwise_num_blocks=[2, 1],
        stackwise_num_filters=[[8, 8], [16]],
        stackwise_kernel_size=[[3, 3], [5]],
        stackwise_num_strides=[[2, 1], [2]],
        stackwise_se_ratio=[[None, 0.25], [0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish"]],
        stackwise_padding=[[1, 1], [2]],
        output_num_filters=32,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=32,
        squeeze_and_excite=0.5,
        image_shape=(32, 32, 3),
        input_num_filters=8,
    )


def _mobilenetv5() -> Any:
    return _m().MobileNetV5Backbone(
        stackwise_block_types=[["er"], ["uir", "uir"]],
        stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[8], [16, 16]],
        stackwise_strides=[[2], [2, 1]],
        stackwise_act_layers=[["relu"], ["relu", "relu"]],
        stackwise_exp_ratios=[[2.0], [2.0, 2.0]],
        stackwise_se_ratios=[[0.0], [0.0, 0.0]],
        stackwise_dw_kernel_sizes=[[0], [3, 3]],
        stackwise_dw_start_kernel_sizes=[[0], [0, 0]],
        stackwise_dw_end_kernel_sizes=[[0], [0, 0]],
        stackwise_exp_kernel_sizes=[[3], [0, 0]],
        stackwise_pw_kernel_sizes=[[1], [0, 0]],
        stackwise_num_heads=[[0], [0, 0]],
        stackwise_key_dims=[[0], [0, 0]],
        stackwise_value_dims=[[0], [0, 0]],
        stackwise_kv_strides=[[0], [0, 0]],
        stackwise_use_cpe=[[False], [False, False]],
        stem_size=8,
        num_features=32,
        use_msfa=False,
        image_shape=(32, 32, 3),
    )


def _efficientnet() -> Any:
    return _m().EfficientNetBackbone(
        stackwise_width_coefficients=[1.0] * 3,
        stackwise_depth_coefficients=[1.0] * 3,
        stackwise_kernel_sizes=[3, 3, 3],
        stackwise_num_repeats=[1, 1, 1],
        stackwise_input_filters=[8, 8, 16],
        stackwise_output_filters=[8, 16, 16],
        stackwise_expansion_ratios=[1, 4, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25],
        stackwise_strides=[1, 2, 2],
        stackwise_block_types=["fused", "fused", "unfused"],
        stackwise_force_input_filters=[0] * 3,
        stackwise_nores_option=[False] * 3,
        num_features=32,
        input_shape=(32, 32, 3),
    )


def _builders() -> dict[str, tuple[Callable[[], Any], int]]:
    """Backbone class name -> (builder, image side); nothing is imported yet."""
    return {
        "CSPNetBackbone": (
            lambda: _m().CSPNetBackbone(
                stem_filters=8,
                stem_kernel_size=3,
                stem_strides=1,
                stackwise_depth=[1, 1],
                stackwise_strides=[1, 2],
                stackwise_num_filters=[16, 32],
                block_type="bottleneck_block",
                stage_type="cs3",
                bottle_ratio=[0.5],
                block_ratio=[0.5],
                image_shape=(32, 32, 3),
            ),
            32,
        ),
        "DINOV2Backbone": (_dinov2, 28),
        "DINOV3Backbone": (
            lambda: _m().DINOV3Backbone(
                patch_size=8,
                num_layers=2,
                hidden_dim=16,
                num_heads=2,
                intermediate_dim=32,
                num_register_tokens=2,
                image_shape=(32, 32, 3),
            ),
            32,
        ),
        "DeiTBackbone": (
            lambda: _m().DeiTBackbone(
                image_shape=(32, 32, 3),
                patch_size=8,
                num_layers=2,
                num_heads=2,
                hidden_dim=16,
                intermediate_dim=32,
            ),
            32,
        ),
        "DenseNetBackbone": (
            lambda: _m().DenseNetBackbone(
                stackwise_num_repeats=[2, 2], image_shape=(32, 32, 3), growth_rate=8
            ),
            32,
        ),
        "EfficientNetBackbone": (_efficientnet, 32),
        "HGNetV2Backbone": (_hgnetv2, 64),
        "MiTBackbone": (_mit, 32),
        "MobileNetBackbone": (_mobilenet, 32),
        "MobileNetV5Backbone": (_mobilenetv5, 32),
        "ResNetBackbone": (_resnet, 32),
        "SwinTransformerBackbone": (
            lambda: _m().SwinTransformerBackbone(
                image_shape=(32, 32, 3),
                embed_dim=16,
                depths=[1, 1],
                num_heads=[1, 2],
                window_size=4,
                patch_size=2,
                mlp_ratio=2.0,
                drop_path=0.0,
            ),
            32,
        ),
        "VGGBackbone": (
            lambda: _m().VGGBackbone(
                stackwise_num_repeats=[1, 2],
                stackwise_num_filters=[8, 16],
                image_shape=(32, 32, 3),
            ),
            32,
        ),
        "ViTBackbone": (
            lambda: _m().ViTBackbone(
                image_shape=(32, 32, 3),
                patch_size=8,
                num_layers=2,
                num_heads=2,
                hidden_dim=16,
                mlp_dim=32,
            ),
            32,
        ),
        "ViTDetBackbone": (
            lambda: _m().ViTDetBackbone(
                hidden_size=16,
                num_layers=2,
                intermediate_dim=32,
                num_heads=2,
                global_attention_layer_indices=[1],
                image_shape=(32, 32, 3),
                patch_size=8,
                num_output_channels=16,
                window_size=2,
            ),
            32,
        ),
        "XceptionBackbone": (
            lambda: _m().XceptionBackbone(
                stackwise_conv_filters=[[8, 16], [32, 32], [32, 32], [64, 64]],
                stackwise_pooling=[False, True, False, False],
                image_shape=(32, 32, 3),
            ),
            32,
        ),
        "BASNetBackbone": (
            lambda: _m().BASNetBackbone(
                image_encoder=_resnet(None, stages=4, stem=8),
                num_classes=1,
                image_shape=(32, 32, 3),
                projection_filters=8,  # feeds the encoder's first stage: its stem width
            ),
            32,
        ),
        "DeepLabV3Backbone": (
            lambda: _m().DeepLabV3Backbone(
                image_encoder=_resnet(32),
                spatial_pyramid_pooling_key="P3",
                upsampling_size=2,
                dilation_rates=[1, 2],
                low_level_feature_key="P2",
                projection_filters=8,
                image_shape=(32, 32, 3),
            ),
            32,
        ),
        "RetinaNetBackbone": (
            lambda: _m().RetinaNetBackbone(
                image_encoder=_resnet(64, stages=3),
                min_level=3,
                max_level=4,
                use_p5=False,
                image_shape=(64, 64, 3),
            ),
            64,
        ),
        "SegFormerBackbone": (
            lambda: _m().SegFormerBackbone(image_encoder=_mit(32), projection_filters=8),
            32,
        ),
        "DepthAnythingBackbone": (
            lambda: _m().DepthAnythingBackbone(
                image_encoder=_dinov2(28),
                reassemble_factors=[4, 2],
                neck_hidden_dims=[8, 16],
                fusion_hidden_dim=8,
                head_hidden_dim=8,
                head_in_index=-1,
                feature_keys=["stage1", "stage2"],
            ),
            28,
        ),
        "DFineBackbone": (
            lambda: _m().DFineBackbone(
                backbone=_hgnetv2(["stage1", "stage2"]),
                decoder_in_channels=[16, 16],
                encoder_hidden_dim=16,
                num_labels=4,
                num_denoising=0,
                learn_initial_query=False,
                num_queries=8,
                anchor_image_size=(64, 64),
                feat_strides=[4, 8],
                num_feature_levels=2,
                hidden_dim=16,
                encoder_in_channels=[16, 32],
                encode_proj_layers=[1],
                num_attention_heads=2,
                encoder_ffn_dim=32,
                num_encoder_layers=1,
                hidden_expansion=0.5,
                depth_multiplier=0.5,
                eval_idx=-1,
                num_decoder_layers=1,
                decoder_attention_heads=2,
                decoder_ffn_dim=32,
                decoder_n_points=[2, 2],
                lqe_hidden_dim=8,
                num_lqe_layers=2,
                out_features=["stage1", "stage2"],
                image_shape=(64, 64, 3),
            ),
            64,
        ),
    }


def backbone_names() -> list[str]:
    """The surveyed backbones."""
    return sorted(_builders())


def uncovered_backbones() -> list[str]:
    """Backbone classes of keras_hub neither surveyed nor excluded with a reason."""
    names = {n for n in dir(_m()) if n.endswith("Backbone")}
    generic = {"Backbone", "FeaturePyramidBackbone"}
    image = {n for n in names if _takes_images(getattr(_m(), n))}
    return sorted(image - set(_builders()) - set(EXCLUDED) - generic)


def _takes_images(cls: Any) -> bool:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return any(p in params for p in ("image_shape", "image_encoder", "vision_encoder", "backbone"))


def build(name: str) -> tuple[Any, int]:
    """A freshly built backbone and its input side."""
    builder, side = _builders()[name]
    return builder(), side


def inputs_for(model: Any, side: int, n: int = 2, seed: int = 0) -> Any:
    """Random inputs matching ``model.inputs`` (images in [0, 1))."""
    rng = np.random.default_rng(seed)
    out = []
    for t in model.inputs:
        shape = [n] + [side if d is None else int(d) for d in t.shape[1:]]
        out.append(rng.uniform(0, 1, shape).astype("float32"))
    if isinstance(model.input, dict):
        return dict(zip(model.input, out))
    return out[0] if len(out) == 1 else out


def _flat(y: Any) -> list[np.ndarray]:
    leaves = keras.tree.flatten(y)
    return [np.asarray(v) for v in leaves]


@dataclass
class HubResult:
    """What one backbone did under a 20% bn_scale prune."""

    name: str
    stage: str = "build"
    error: str = ""
    prunes: bool = False
    shapes_kept: bool = False
    finite: bool = False
    params_before: int = 0
    params_after: int = 0
    plan_params_after: int = 0
    exact: bool | None = None
    max_diff: float = float("nan")
    scale: float = float("nan")
    share: float = 0.0
    reasons: list[Any] = field(default_factory=list)
    layernorm_groups: list[int] = field(default_factory=list)
    pruned_groups: list[int] = field(default_factory=list)
    exact_removed: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.prunes
            and self.shapes_kept
            and self.finite
            and self.params_after < self.params_before
            and self.params_after == self.plan_params_after
            and bool(self.exact)
            and self.exactness_checked
        )

    @property
    def exactness_checked(self) -> bool:
        """The exactness check removed channels, or could not and the plan says why.

        Removing a channel a LayerNorm (or RmsNorm2d) normalises over changes
        the statistics, so such groups are kept whole for the check; when every
        group the plan prunes is one, the check removes nothing, and each of
        those groups must then carry the plan's "normalises over channels" note.
        """
        if self.exact_removed > 0:
            return True
        noted = set(self.layernorm_groups)
        return bool(self.pruned_groups) and all(g in noted for g in self.pruned_groups)


def layernorm_groups(plan: Any) -> list[int]:
    """Groups the plan names as normalised over channels (not exactly prunable)."""
    return [g.id for g in plan.groups if any("normalises over channels" in n for n in g.notes)]


def without_groups(plan: Any, ids: list[int]) -> Any:
    """A copy of ``plan`` that keeps every channel of the groups ``ids``."""
    groups = [
        replace(g, kept=list(range(g.size_before)), size_after=g.size_before) if g.id in ids else g
        for g in plan.groups
    ]
    return replace(plan, groups=groups)


def check(name: str) -> HubResult:
    """Build, plan, prune, run and check dead-channel exactness for one backbone."""
    res = HubResult(name)
    start = time.perf_counter()
    try:
        run(res)
    except Exception as exc:  # noqa: BLE001 - the survey records every failure
        frames = traceback.extract_tb(exc.__traceback__)
        where = next(
            (
                f"{os.path.basename(f.filename)}:{f.lineno}"
                for f in reversed(frames)
                if "secateur" in f.filename or "/pruner/" in f.filename
            ),
            "",
        )
        msg = " ".join(str(exc).split())[:300]
        res.error = f"{res.stage}: {type(exc).__name__}: {msg} [{where}]"
    res.seconds = time.perf_counter() - start
    keras.backend.clear_session()
    return res


def run(res: HubResult) -> None:
    """Fill ``res`` stage by stage; exceptions propagate (``res.stage`` says where)."""
    keras.utils.set_random_seed(1234)
    model, side = build(res.name)
    randomize(model)
    x = inputs_for(model, side)
    y0 = _flat(model(x, training=False))
    res.params_before = model.count_params()
    res.stage = "make_plan"
    plan = make_plan(model, PruneSpec(ratio=RATIO, criterion="bn_scale"))
    res.share = prunable_share(plan.groups)
    res.reasons = frozen_reasons(plan.groups)
    res.layernorm_groups = layernorm_groups(plan)
    res.pruned_groups = [g.id for g in plan.groups if g.pruned]
    res.prunes = plan.removed_channels > 0
    res.plan_params_after = plan.params_after
    res.stage = "apply_plan"
    pruned = apply_plan(model, plan)
    res.params_after = pruned.count_params()
    res.stage = "run"
    y1 = _flat(pruned(x, training=False))
    res.shapes_kept = [a.shape for a in y0] == [b.shape for b in y1]
    res.finite = all(np.all(np.isfinite(b)) for b in y1)
    res.stage = "exactness"
    exact_plan = without_groups(plan, res.layernorm_groups)
    res.exact_removed = exact_plan.removed_channels
    kill_pruned_channels(model, exact_plan)
    ref = _flat(model(x, training=False))
    out = _flat(apply_plan(model, exact_plan)(x, training=False))
    res.scale = max(float(np.max(np.abs(a))) for a in ref)
    res.max_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, out))
    res.exact = res.max_diff <= EXACT_TOL * max(1.0, res.scale)
    res.stage = "done"


def row(res: HubResult) -> str:
    """One table row for the survey."""
    ratio = f"{res.params_after:,}/{res.params_before:,}" if res.params_after else "-"
    reasons = "; ".join(f"{r.reason} ({r.channels})" for r in res.reasons[:3])
    exact = "-"
    if res.exact is not None:
        verdict = "yes" if res.exact else f"NO (max diff {res.max_diff:.2g}/{res.scale:.2g})"
        exact = f"{verdict}, {res.exact_removed} ch removed"
    return " | ".join(
        [
            res.name.removesuffix("Backbone"),
            "yes" if res.prunes else "no",
            exact,
            ratio,
            f"{res.share:.0%}",
            reasons or "-",
            res.error or "-",
            f"{res.seconds:.1f}s",
        ]
    )


HEADER = (
    "model | prunes | exact | params after/before | prunable share | top frozen reasons "
    "| error | time"
)
