"""Configurations and inputs an adapter cannot prune raise tokprune's own errors (DESIGN §3): an unsupported
model configuration an `UnsupportedModelError` (a TypeError) at `tokprune.apply`, before anything is
installed; an unsupported input an `UnsupportedInputError` (a ValueError) at the forward, and the model
works again afterwards."""

from __future__ import annotations

import pytest
import torch
from test_invariants import _prefill
from tiny_models import _text_config, batch_inputs, make_tokenizer

import tokprune
from tokprune.errors import UnsupportedInputError, UnsupportedModelError


def _refused_at_apply(model, match: str) -> None:
    with pytest.raises(UnsupportedModelError, match=match) as info:
        tokprune.apply(model, "fastervlm", budget=8)
    assert isinstance(info.value, TypeError)
    assert not hasattr(model, "_tokprune_pruner")


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_cls_tokens_inside_tile_grids_are_refused_at_apply(tiny, family):
    """LLaVA-NeXT with a CLIP tower and strategy 'full': a [CLS] per tile would sit inside the grids.
    LLaVA-OneVision's SigLIP tower with 'default' would drop a real patch of every tile."""
    model, _ = tiny(family, "sdpa")
    cfg = model.config
    original = cfg.vision_feature_select_strategy
    cfg.vision_feature_select_strategy = "full" if family == "llava_next" else "default"
    try:
        _refused_at_apply(model, "\\[CLS\\]")
    finally:
        cfg.vision_feature_select_strategy = original


def test_feature_layer_of_patch_embeddings_is_refused_at_apply(tiny):
    model, _ = tiny("llava", "sdpa")
    original = model.config.vision_feature_layer
    model.config.vision_feature_layer = 0  # hidden_states[0]: the patch embeddings, before any attention
    try:
        _refused_at_apply(model, "patch embeddings")
    finally:
        model.config.vision_feature_layer = original


def test_a_tower_without_encoder_layers_is_refused_at_apply():
    """LlavaForConditionalGeneration over Pixtral's tower (variable image sizes, `transformer.layers`)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PixtralVisionConfig

    tok = make_tokenizer(["<image>"])
    vision = PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64,
        patch_size=16, head_dim=8,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    _refused_at_apply(LlavaForConditionalGeneration(cfg).eval(), "PixtralVisionModel is not supported")


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_pixels_without_image_sizes_are_refused_at_the_forward(tiny, family):
    model, proc = tiny(family, "sdpa")
    inputs = batch_inputs(family, proc, (1, 1))
    expected = _prefill(model, inputs)
    without = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with (
        tokprune.apply(model, "random", keep_ratio=0.25),
        pytest.raises(UnsupportedInputError, match="pass the image_sizes the processor returns"),
    ):
        _prefill(model, without)
    assert torch.equal(_prefill(model, inputs), expected)


def test_llava_with_image_sizes_is_refused_at_the_forward(tiny):
    model, proc = tiny("llava", "sdpa")
    inputs = batch_inputs("llava", proc, (1, 1))
    sizes = torch.tensor([[112, 112], [112, 112]])
    with (
        tokprune.apply(model, "random", keep_ratio=0.25),
        pytest.raises(UnsupportedInputError, match="without image_sizes"),
    ):
        _prefill(model, {**inputs, "image_sizes": sizes})
