"""Gemma 3 specifics: SigLIP signals pooled as the projector pools, the bidirectional image blocks of a
pruned prompt, and clear errors for inputs the adapter cannot prune along."""

from __future__ import annotations

import pytest
import torch
from reference import (
    LMInputRecorder,
    assert_prefill_matches,
    original_positions,
    present_after,
    reference_logits,
)
from tiny_gemma3 import IMAGE_SIZE, PATCH_SIZE, TOKENS_PER_IMAGE, tiny_gemma3
from tiny_models import batch_inputs
from tokprune.patches import VisionSignalStore, adapter_for

import tokprune
from tokprune.errors import UnsupportedInputError


@pytest.fixture(scope="module")
def eager_gemma3():
    return tiny_gemma3("eager")


def _pool(values: torch.Tensor) -> torch.Tensor:
    """(n, P*P, C) per patch -> (n * T, C): mean over each kernel x kernel block of the patch grid, written
    out independently of the projector's AvgPool2d."""
    n, _, channels = values.shape
    side, tokens_side = IMAGE_SIZE // PATCH_SIZE, int(TOKENS_PER_IMAGE**0.5)
    k = side // tokens_side
    grid = values.view(n, tokens_side, k, tokens_side, k, channels)
    return grid.mean(dim=(2, 4)).reshape(n * TOKENS_PER_IMAGE, channels)


@pytest.mark.parametrize("layer", [0, -1])
def test_vision_signals_match_eager_maps_pooled_like_the_projector(eager_gemma3, layer):
    """cls_attention (no [CLS]: attention received) and vit_keys at a SigLIP layer, per LLM token."""
    model, proc = eager_gemma3
    pixel_values = batch_inputs("gemma3", proc, (1, 2))["pixel_values"]  # 3 images
    tower = model.model.vision_tower
    layers = tower.vision_model.encoder.layers if hasattr(tower, "vision_model") else tower.encoder.layers
    attn_module = layers[layer].self_attn
    keys_out = []
    handle = attn_module.k_proj.register_forward_hook(lambda m, a, out: keys_out.append(out))
    names = {f"cls_attention@{layer}", f"vit_keys@{layer}"}
    store = VisionSignalStore()
    hooks = adapter_for(model).install_vision_hooks(names, store)
    try:
        with torch.no_grad():
            maps = tower(pixel_values=pixel_values, output_attentions=True).attentions[layer]  # (n, H, N, N)
    finally:
        handle.remove()
        for h in hooks:
            h.remove()
    n, heads, length, _ = maps.shape
    received = maps.mean(dim=(1, 2))  # (n, N) column mean over heads and queries
    expected = _pool(received[..., None])[:, 0]
    assert store.values[f"cls_attention@{layer}"].shape == (n * TOKENS_PER_IMAGE,)
    torch.testing.assert_close(store.values[f"cls_attention@{layer}"], expected, atol=1e-6, rtol=0)
    keys = keys_out[0].view(n, length, heads, -1).mean(2)
    torch.testing.assert_close(store.values[f"vit_keys@{layer}"], _pool(keys), atol=1e-5, rtol=0)


def test_pruned_prompt_keeps_bidirectional_blocks_of_kept_image_tokens():
    """After pre-LLM pruning, layer 0 (sliding) and layer 1 (full) get masks in which the kept tokens of an
    image see each other both ways, text stays causal, and images do not see later images."""
    model, proc = tiny_gemma3("sdpa")
    inputs = batch_inputs("gemma3", proc, (1, 2))
    seen = {}

    def spy(j):
        def hook(module, args, kwargs):
            seen[j] = (
                kwargs["attention_mask"],
                args[0].shape[1] if args else kwargs["hidden_states"].shape[1],
            )

        return hook

    layers = model.model.language_model.layers
    handles = [layers[j].register_forward_pre_hook(spy(j), with_kwargs=True) for j in (0, 1)]
    try:
        with tokprune.apply(model, "random", budget=5) as pruner, torch.no_grad():
            model(**inputs)
            kept = pruner.stats.kept
    finally:
        for h in handles:
            h.remove()
    for j in (0, 1):
        mask, length = seen[j]
        assert mask.dtype == torch.bool and mask.shape[-1] == length  # sdpa: a boolean (B, 1, L, L) mask
    row = 1  # two images, 5 kept tokens each
    full = seen[1][0][row, 0]  # (L', L') True = may attend
    ids = inputs["input_ids"][row]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    present = inputs["attention_mask"][row].bool().clone()
    dropped = torch.ones(visual.numel(), dtype=torch.bool)
    dropped[kept[row]] = False
    present[visual[dropped]] = False
    is_image = torch.zeros(full.shape[-1], dtype=torch.bool)  # the compacted row, right-aligned
    is_image[full.shape[-1] - int(present.sum()) :] = ids[present] == model.config.image_token_id
    slots = is_image.nonzero().squeeze(1)
    first, second = slots[:5], slots[5:]
    assert len(second) == 5
    assert full[first][:, first].all() and full[second][:, second].all()  # bidirectional within each image
    assert not full[first][:, second].any()  # an image does not see a later image
    last_text = (~is_image).nonzero().squeeze(1)[-1]
    assert not full[first[0], last_text] and full[last_text, first].all()  # text stays causal
    sliding = seen[0][0][row, 0]
    assert sliding[first][:, first].all()  # the window (24 slots) holds a 5-token block


def test_token_type_ids_must_mark_the_image_tokens():
    model, proc = tiny_gemma3("sdpa")
    inputs = batch_inputs("gemma3", proc, (1, 1))
    inputs["token_type_ids"] = torch.zeros_like(inputs["token_type_ids"])
    inputs["token_type_ids"][:, -1] = 1
    refused = pytest.raises(UnsupportedInputError, match="token_type_ids")
    with tokprune.apply(model, "random", budget=5), torch.no_grad(), refused:
        model(**inputs)


def test_without_token_type_ids_the_masks_stay_causal_as_in_the_model():
    """No token_type_ids: the model's masks are causal; the pruned run equals the masked reference then."""
    model, proc = tiny_gemma3("sdpa")
    inputs = batch_inputs("gemma3", proc, (1, 2))
    inputs.pop("token_type_ids")
    with tokprune.apply(model, "random", keep_ratio=0.25) as pruner:
        recorder = LMInputRecorder(model)
        with torch.no_grad():
            pruned = model(**inputs, position_ids=original_positions(model, inputs)).logits
        recorder.remove()
        stats, embeds = pruner.stats, recorder.embeds
    reference = reference_logits(model, inputs, stats, embeds, inputs["input_ids"][:, :0])[0]
    assert_prefill_matches(pruned, reference, present_after(model, inputs, stats), 1e-5)


def test_a_prebuilt_mask_dict_is_refused():
    model, proc = tiny_gemma3("sdpa")
    inputs = batch_inputs("gemma3", proc, (1, 1))
    built = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(
        lambda m, a, kwargs: built.update(kwargs["attention_mask"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    inputs["attention_mask"] = built
    refused = pytest.raises(UnsupportedInputError, match="2-D")
    with tokprune.apply(model, "random", budget=5), torch.no_grad(), refused:
        model(**inputs)
