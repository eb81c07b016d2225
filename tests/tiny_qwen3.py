"""Tiny, offline Qwen3-VL models (dense and MoE decoders) of the real classes, random weights.

The vision tower has 3 blocks, each feeding a deepstack merger (`deepstack_visual_indexes=[0, 1, 2]`), so
the LLM adds visual features after decoder layers 0, 1 and 2 of 4: in-LLM boundaries 1 .. 3 all meet a
deepstack add after them. Patch size 14 (the real model uses 16) lets the Qwen2-VL image-only processor of
the other Qwen tiny models lay the prompts out: Qwen3-VL's processor expands images the same way
(t * h * w / 4 `<|image_pad|>` tokens); its video processor needs torchvision (see tests/test_video.py).
"""

from __future__ import annotations

import torch

from tokprune.bench.synthetic import QWEN_SPECIALS, make_tokenizer, qwen_image_processor

VISION = dict(
    depth=3,
    hidden_size=32,
    out_hidden_size=64,
    intermediate_size=64,
    num_heads=4,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_channels=3,
    num_position_embeddings=64,  # an 8 x 8 learned grid, interpolated to every image's grid
    deepstack_visual_indexes=[0, 1, 2],
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)


def _qwen3(cls_name: str, attn: str, **text_extra):
    import transformers
    from tiny_models import _text_config  # imported here: tiny_models imports this module

    torch.manual_seed(0)
    tok = make_tokenizer(QWEN_SPECIALS)
    ids = {k: tok.convert_tokens_to_ids(k) for k in QWEN_SPECIALS}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    cfg = getattr(transformers, cls_name.replace("ForConditionalGeneration", "Config"))(
        vision_config=VISION,
        text_config=_text_config(tok, rope_parameters=rope, head_dim=16, **text_extra),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    cfg._attn_implementation = attn
    model = getattr(transformers, cls_name)(cfg).eval()
    return model, qwen_image_processor(tok, min_pixels=56 * 56, max_pixels=112 * 168)


def tiny_qwen3vl(attn: str = "sdpa"):
    return _qwen3("Qwen3VLForConditionalGeneration", attn)


def tiny_qwen3vl_moe(attn: str = "sdpa"):
    return _qwen3("Qwen3VLMoeForConditionalGeneration", attn, **MOE)
