"""Tiny, offline models of the real VLM classes (random weights) and batched inputs for them.

Configs are built in code; tokenizers are WordLevel (`tokenizers`) so that '<image>' runs split right;
image processors are the PIL classes (torchvision is not installed). The Qwen processor is subclassed to
drop its video processor, which needs torchvision.
"""

from __future__ import annotations

import torch

from tokprune.bench.synthetic import (  # noqa: F401
    QWEN_SPECIALS,
    llava_processor,
    make_tokenizer,
    qwen_image_processor,
    rand_image,
)

MODELS = ("llava", "qwen2_vl", "qwen2_5_vl")


def _text_config(tok, **extra) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.2,
        **extra,
    )


def tiny_llava(attn: str = "sdpa"):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    tok = make_tokenizer(["<image>"])
    vcfg = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=112,
        patch_size=16,
        projection_dim=64,
    )
    cfg = LlavaConfig(
        vision_config=vcfg,
        text_config=LlamaConfig(**_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=49,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    proc = llava_processor(tok, 112, 16)
    return model, proc


def _qwen_processor(tok):
    return qwen_image_processor(tok, min_pixels=56 * 56, max_pixels=112 * 168)


def _qwen(cls_name: str, vision_config: dict, attn: str):
    import transformers

    torch.manual_seed(0)
    tok = make_tokenizer(QWEN_SPECIALS)
    ids = {k: tok.convert_tokens_to_ids(k) for k in QWEN_SPECIALS}
    config_cls = getattr(transformers, cls_name.replace("ForConditionalGeneration", "Config"))
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    cfg = config_cls(
        vision_config=vision_config,
        text_config=_text_config(tok, rope_parameters=rope),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    cfg._attn_implementation = attn
    model = getattr(transformers, cls_name)(cfg).eval()
    return model, _qwen_processor(tok)


def tiny_qwen2vl(attn: str = "sdpa"):
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,
        num_heads=4,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    return _qwen("Qwen2VLForConditionalGeneration", vision, attn)


def tiny_qwen25vl(attn: str = "sdpa"):
    vision = dict(
        depth=3,
        hidden_size=32,
        out_hidden_size=64,
        intermediate_size=64,
        num_heads=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    return _qwen("Qwen2_5_VLForConditionalGeneration", vision, attn)


BUILDERS = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2vl, "qwen2_5_vl": tiny_qwen25vl}


def prompt_text(family: str, n_images: int, words: str) -> str:
    image = "<image>" if family == "llava" else "<|vision_start|><|image_pad|><|vision_end|>"
    return f"USER: {' '.join([image] * n_images)} {words} ASSISTANT:"


def batch_inputs(family: str, proc, n_images_per_row=(1, 1), sizes=((112, 112), (112, 168))):
    """A left-padded batch: row texts of different lengths; Qwen images of different grid sizes."""
    texts, images, seed = [], [], 0
    words = ["describe the image please", "w1 w2 w3 w4 w5 w6 w7 w8 describe the image"]
    for row, n in enumerate(n_images_per_row):
        texts.append(prompt_text(family, n, words[row % 2]))
        for _ in range(n):
            h, w = sizes[seed % len(sizes)] if family != "llava" else (112, 112)
            images.append(rand_image(h, w, seed))
            seed += 1
    inputs = proc(text=texts, images=images, return_tensors="pt", padding=True)
    return dict(inputs)


def text_inputs(proc):
    return dict(proc.tokenizer(["USER: describe the image please ASSISTANT:"], return_tensors="pt"))
