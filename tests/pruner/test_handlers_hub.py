"""keras-hub layers and blocks: traced, pruned and exact on dead channels.

keras-hub is a dev dependency only: the pruner registers its layers once it
is loaded and never imports it itself.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import pytest

from secateur.pruner import PruneSpec, analyze, apply_plan, make_plan
from secateur.pruner.plan_report import frozen_reasons

from .conftest import assert_same_outputs, kill_pruned_channels, randomize

pytest.importorskip("keras_hub")

from keras_hub.src.models.deit.deit_layers import DeiTEncoder
from keras_hub.src.models.dinov2 import dinov2_layers
from keras_hub.src.models.efficientnet.fusedmbconv import FusedMBConvBlock
from keras_hub.src.models.efficientnet.mbconv import MBConvBlock
from keras_hub.src.models.hgnetv2 import hgnetv2_layers
from keras_hub.src.models.mit import mit_layers
from keras_hub.src.models.mobilenet.mobilenet_backbone import InvertedResidualBlock
from keras_hub.src.models.mobilenetv5 import mobilenetv5_blocks, mobilenetv5_layers
from keras_hub.src.models.vit.vit_layers import ViTEncoderBlock

L = keras.layers


def _image_model(block: Callable, shape=(8, 8, 3), width: int = 8):
    """conv+bn producer -> block -> 1x1 conv -> pooled head."""
    inp = keras.Input(shape)
    x = L.Conv2D(width, 3, padding="same", name="p")(inp)
    x = L.BatchNormalization(name="p_bn")(x)
    x = block(x)
    x = L.Conv2D(4, 1, name="c")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, name="head")(x))


def _sequence_model(block: Callable, shape=(5, 8)):
    """The block reads the model input, so its residual stream is frozen."""
    inp = keras.Input(shape)
    x = block(inp)
    x = L.Dense(4, name="c")(x)
    return keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))


def _dense_model(layer: Callable, shape=(5, 6)):
    inp = keras.Input(shape)
    x = L.Dense(8, name="p")(inp)
    x = layer(x)
    x = L.Dense(4, name="c")(x)
    return keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(x)))


def _prune_dead_exactly(model, x, ratio=0.5, must_prune=("p",), noted=False):
    # Compensation would fold the removed channels' means (known from the
    # live weights at planning) into biases the killed model does not need.
    spec = PruneSpec(ratio=ratio, criterion="random", seed=2, bias_compensation=False)
    plan = make_plan(model, spec)
    assert plan.unsupported_layers == [], plan.unsupported_layers
    pruned = {o for g in plan.groups if g.pruned for o in g.origins}
    for origin in must_prune:
        assert any(o == origin or o.startswith(origin) for o in pruned), (origin, pruned)
    kill_pruned_channels(model, plan)
    new = apply_plan(model, plan)
    assert new.count_params() == plan.params_after < model.count_params()
    if noted:
        assert new(x).shape == model(x).shape
        return plan
    assert_same_outputs(model, new, x)
    return plan


def _images(shape=(8, 8, 3)):
    return np.random.default_rng(0).normal(size=(3, *shape)).astype("float32")


# -- per-channel layers -------------------------------------------------------


def test_dinov2LayerScale_deadChannels_prunedExactly() -> None:
    model = randomize(_dense_model(dinov2_layers.DINOV2LayerScale(8, init_values=0.5, name="ls")))
    ls = model.get_layer("ls")
    ls.set_weights([np.linspace(0.1, 2.0, 8).astype("float32")])
    _prune_dead_exactly(model, _images((5, 6)))


def test_layerScale2d_and_dropPath_deadChannels_prunedExactly() -> None:
    def body(x):
        x = mobilenetv5_layers.LayerScale2d(8, init_values=0.3, name="ls")(x)
        return mobilenetv5_layers.DropPath(0.1, name="dp")(x)

    _prune_dead_exactly(randomize(_image_model(body)), _images())


def test_rmsNorm2d_isPrunedWithANote() -> None:
    model = randomize(_image_model(mobilenetv5_layers.RmsNorm2d(8, name="rms")))
    plan = _prune_dead_exactly(model, _images(), noted=True)
    assert any("RmsNorm2d" in n for g in plan.groups for n in g.notes)


def test_hgnetv2LearnableAffine_constantOfDeadChannels_isCompensated() -> None:
    """scale*x + bias: a dead channel outputs the bias, folded downstream."""
    model = randomize(_image_model(hgnetv2_layers.HGNetV2LearnableAffineBlock(0.7, 0.4)))
    spec = PruneSpec(ratio=0.5, criterion="random", seed=2, bias_compensation=True)
    plan = make_plan(model, spec)
    assert plan.unsupported_layers == []
    kill_pruned_channels(model, plan)
    assert_same_outputs(model, apply_plan(model, plan), _images())


def test_layerScale2d_channelsFirst_freezesWithReason() -> None:
    inp = keras.Input((8, 4, 4))
    x = L.Dense(4, name="p")(inp)
    x = mobilenetv5_layers.LayerScale2d(4, data_format="channels_first", name="ls")(
        L.Permute((3, 1, 2))(x)
    )
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(x)))
    assert any("channels_first" in why for _, _, why in analyze(model).unsupported)


# -- inlined blocks -------------------------------------------------------------

IMAGE_BLOCKS: dict[str, Callable] = {
    "mbconv_se": lambda: MBConvBlock(8, 8, expand_ratio=4, se_ratio=0.25, dropout=0.0, name="b"),
    "fused_mbconv_stride2": lambda: FusedMBConvBlock(
        8, 16, expand_ratio=4, strides=2, se_ratio=0.25, dropout=0.0, name="b"
    ),
    "inverted_residual": lambda: InvertedResidualBlock(
        expansion=24,
        infilters=8,
        filters=8,
        kernel_size=3,
        stride=1,
        squeeze_excite_ratio=None,
        activation="hard_swish",
        padding=1,
        name="b",
    ),
    "inverted_residual_se": lambda: InvertedResidualBlock(
        expansion=24,
        infilters=8,
        filters=8,
        kernel_size=3,
        stride=1,
        squeeze_excite_ratio=0.25,
        activation="relu",
        padding=1,
        name="b",
    ),
    "edge_residual": lambda: mobilenetv5_blocks.EdgeResidual(
        8, exp_ratio=4.0, data_format="channels_last", channel_axis=-1, name="b"
    ),
    "hgnetv2_basic_layer": lambda: hgnetv2_layers.HGNetV2BasicLayer(
        8,
        6,
        16,
        layer_num=2,
        use_learnable_affine_block=True,
        data_format="channels_last",
        channel_axis=-1,
        name="b",
    ),
    "universal_inverted_residual": lambda: mobilenetv5_blocks.UniversalInvertedResidual(
        8,
        exp_ratio=4.0,
        layer_scale_init_value=0.5,
        data_format="channels_last",
        channel_axis=-1,
        name="b",
    ),
}


@pytest.mark.parametrize("case", sorted(IMAGE_BLOCKS))
def test_imageBlock_internalChannels_prunedExactly(case: str) -> None:
    model = randomize(_image_model(IMAGE_BLOCKS[case]()))
    graph = analyze(model)
    inner = [g for g in graph.groups() if g.prunable and all(o.startswith("b/") for o in g.origins)]
    assert inner, f"no prunable group inside the block: {[g.origins for g in graph.groups()]}"
    _prune_dead_exactly(model, _images(), must_prune=("b/",))


SEQUENCE_BLOCKS: dict[str, Callable] = {
    "vit_encoder_block": lambda: ViTEncoderBlock(num_heads=2, hidden_dim=8, mlp_dim=16, name="b"),
    # Reshapes through the batch size: (B, N, C) -> (B, H, W, C) -> (B, N, C).
    "mix_ffn": lambda: mit_layers.MixFFN(channels=8, mid_channels=16),
    "dinov2_layer": lambda: dinov2_layers.DINOV2Layer(
        hidden_dim=8, num_heads=2, intermediate_dim=16, name="b"
    ),
}


@pytest.mark.parametrize("case", sorted(SEQUENCE_BLOCKS))
def test_transformerBlock_mlpUnits_prunedExactly(case: str) -> None:
    block = SEQUENCE_BLOCKS[case]()
    model = randomize(_sequence_model(block, shape=(16, 8)))
    _prune_dead_exactly(model, _images((16, 8)), must_prune=(block.name + "/",))


def test_deitEncoder_blocksReturnNoneScores_inlinedAndMlpUnitsPrunedExactly() -> None:
    """DeiT's blocks return ``(x, None)`` and its encoder ``(x, empty, empty)``.

    The None and constant outputs nobody consumes are left out of the
    inlined graphs, so the encoder and its blocks are traced through.
    """
    encoder = DeiTEncoder(num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=16, name="e")
    inp = keras.Input((16, 8))
    x, _, _ = encoder(inp)
    x = L.Dense(4, name="c")(x)
    model = randomize(keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x))))
    plan = _prune_dead_exactly(model, _images((16, 8)), must_prune=("e/transformer_block_",))
    reasons = frozen_reasons(plan.groups)
    assert not any("DeiT" in r.reason for r in reasons), reasons
    # The blocks get their own output spec back (scores None again).
    block = encoder.encoder_layers[0]
    assert "compute_output_spec" not in vars(block)
    _, scores = block.compute_output_spec(keras.KerasTensor((None, 16, 8)))
    assert scores is None


def test_blockClassNotInlined_freezesWithItsReason() -> None:
    """A keras-hub layer that is neither handled nor inlined says why."""
    from keras_hub.src.models.vit.vit_layers import ViTPatchingAndEmbedding

    inp = keras.Input((8, 8, 3))
    embed = ViTPatchingAndEmbedding(image_size=(8, 8), patch_size=(4, 4), hidden_dim=8)
    x = embed(inp)
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(x)))
    [(_, cls, why)] = analyze(model).unsupported
    assert cls == "ViTPatchingAndEmbedding"
    assert why.startswith("keras-hub block layer: a patch embedding"), why
