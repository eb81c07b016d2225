"""LlavaForConditionalGeneration over a SigLIP tower (no [CLS] token), vision_feature_select_strategy="full":
every patch is an image token (a plain 7 x 7 grid), and the [CLS]-attention methods use the attention each
patch receives, as on the other SigLIP families. "default" would drop a real patch and is refused.

The tiny model: a 3-layer SigLIP tower over 112 px images in 16 px patches, the LLaVA test LLM
(`tiny_models._text_config`), the real LlavaProcessor expanding `<image>` to 49 tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from checks import final_count
from test_invariants import (
    TINY_OPTIONS,
    _prefill,
    assert_keep_all_identical,
    assert_matches_reference,
    run_pruned,
)
from tiny_models import batch_inputs, tiny_llava
from tokprune.patches import VisionSignalStore, adapter_for

import tokprune
from tokprune.core.budget import Budget
from tokprune.errors import UnsupportedModelError
from tokprune.methods import REGISTRY

SIDE = 7  # patches per image side: 112 px / 16 px
METHODS = [m for m in tokprune.available_methods() if not REGISTRY[m].needs_tiles]


@pytest.fixture(scope="module")
def siglip_llava():
    return tiny_llava("sdpa", tower="siglip")


def _batch(proc) -> dict:
    """Left-padded rows with 1 and 2 images (LLaVA's processor resizes every image to 112 x 112)."""
    return batch_inputs("llava", proc, (1, 2))


def test_every_patch_is_an_image_token(siglip_llava):
    model, proc = siglip_llava
    inputs = _batch(proc)
    adapter = adapter_for(model)
    assert not adapter.has_cls and not adapter.keeps_cls
    layout = adapter.image_layout(inputs)
    assert layout.counts == [SIDE * SIDE] * 3
    assert layout.grids == [(SIDE, SIDE)] * 3
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 3 * SIDE * SIDE


def test_cls_attention_is_the_attention_each_patch_receives():
    model, proc = tiny_llava("eager", tower="siglip")
    pixel_values = _batch(proc)["pixel_values"]
    store = VisionSignalStore()
    hooks = adapter_for(model).install_vision_hooks({"cls_attention", "received_attention"}, store)
    try:
        with torch.no_grad():
            maps = model.model.vision_tower(pixel_values=pixel_values, output_attentions=True).attentions[-1]
    finally:
        for hook in hooks:
            hook.remove()
    expected = maps.mean(dim=(1, 2)).flatten()  # (n * P,): column mean over heads and queries
    torch.testing.assert_close(store.values["cls_attention"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(store.values["received_attention"], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_pruned_equals_masked_reference(siglip_llava, method):
    """Prefill and every decode step equal the masked reference; ceil(0.25 * 49) = 13 tokens kept per image
    at the final stage (DART's and SparseVLM's codes count their own way: `stage_counts`); remove() restores."""
    model, proc = siglip_llava
    inputs = _batch(proc)
    unpatched = _prefill(model, inputs)
    pruner = tokprune.apply(model, method, keep_ratio=0.25, **TINY_OPTIONS.get(method, {}))
    prefill, generated = run_pruned(model, inputs, pruner)
    per_image = final_count(method, TINY_OPTIONS.get(method, {}), Budget(ratio=0.25), 49)
    assert per_image == math.ceil(0.25 * 49) or method in ("dart", "sparsevlm")  # their codes' own counts
    assert prefill[1].visual_kept == [per_image, 2 * per_image]
    assert_matches_reference(model, inputs, prefill, generated)
    assert torch.equal(_prefill(model, inputs), unpatched)


@pytest.mark.parametrize("method", ["visionzip", "fastv"])
def test_keep_all_is_bit_identical(siglip_llava, method):
    model, proc = siglip_llava
    assert_keep_all_identical(model, _batch(proc), method)


def test_default_strategy_is_refused(siglip_llava):
    model, _ = siglip_llava
    model.config.vision_feature_select_strategy = "default"
    try:
        with pytest.raises(UnsupportedModelError, match="no \\[CLS\\].*use 'full'"):
            tokprune.apply(model, "fastervlm", budget=8)
    finally:
        model.config.vision_feature_select_strategy = "full"
    assert not hasattr(model, "_tokprune_pruner")
