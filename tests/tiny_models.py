"""Tiny, offline models of the real VLM classes (random weights) and batched inputs for them.

Configs are built in code; tokenizers are WordLevel (`tokenizers`) so that '<image>' runs split right;
image processors are the PIL classes (torchvision is not installed). The Qwen processor is subclassed to
drop its video processor, which needs torchvision.
"""

from __future__ import annotations

import torch
from tiny_gemma3 import GEMMA3_IMAGE, gemma3_counts, tiny_gemma3
from tiny_internvl import internvl_counts, tiny_internvl
from tiny_onevision import onevision_counts, tiny_onevision
from tiny_qwen3 import tiny_qwen3vl, tiny_qwen3vl_moe
from tiny_smolvlm import SMOLVLM_SIZES, smolvlm_counts, tiny_idefics3, tiny_smolvlm

from tokprune.bench.synthetic import (  # noqa: F401
    QWEN_SPECIALS,
    llava_processor,
    make_tokenizer,
    qwen_image_processor,
    rand_image,
)

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# the text a prompt holds for one image, by family (default '<image>', which the processor expands)
IMAGE_PLACEHOLDER = {
    "qwen2_vl": QWEN_IMAGE,
    "qwen2_5_vl": QWEN_IMAGE,
    "qwen3_vl": QWEN_IMAGE,
    "qwen3_vl_moe": QWEN_IMAGE,
    "internvl": "<IMG_CONTEXT>",
    "gemma3": GEMMA3_IMAGE,
}
# families whose processor resizes every image to one size (others get images of different sizes)
FIXED_SIZE = ("llava",)
# families whose images get other sizes than batch_inputs' default (to get different tilings in a batch)
IMAGE_SIZES = {"smolvlm": SMOLVLM_SIZES}
# families whose processor takes the images grouped per prompt (a list of lists)
NESTED_IMAGES = ("gemma3",)


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


def tiny_llava(attn: str = "sdpa", tower: str = "clip"):
    """LlavaForConditionalGeneration over 112 px images in 16 px patches (49 tokens per image): a CLIP tower
    with [CLS] under the "default" strategy and feature layer -2 (LLaVA-1.5), or tower="siglip": a SigLIP
    tower without [CLS] under "full" and feature layer -1."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    tok = make_tokenizer(["<image>"])
    dims = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=112,
        patch_size=16,
    )  # fmt: skip
    clip = tower == "clip"
    vcfg = (
        CLIPVisionConfig(**dims, projection_dim=64)
        if clip
        else SiglipVisionConfig(**dims, vision_use_head=False)
    )
    cfg = LlavaConfig(
        vision_config=vcfg,
        text_config=LlamaConfig(**_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=49,
        vision_feature_layer=-2 if clip else -1,
        vision_feature_select_strategy="default" if clip else "full",
    )
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    proc = llava_processor(tok, 112, 16, cls=clip)
    return model, proc


def tiny_llava_next(attn: str = "sdpa"):
    """AnyRes with 112 px tiles of 7x7 patches; pinpoints up to 224x224, so images get 1x2, 2x1 or 2x2
    tiles plus the base view, unpadded to their aspect ratio, with a newline token per grid row."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    torch.manual_seed(0)
    tok = make_tokenizer(["<image>"])
    pinpoints = [[112, 224], [224, 112], [224, 224]]
    vcfg = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=112,
        patch_size=16, projection_dim=64,
    )  # fmt: skip
    cfg = LlavaNextConfig(
        vision_config=vcfg, text_config=LlamaConfig(**_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=49,
    )  # fmt: skip
    cfg._attn_implementation = attn
    model = LlavaNextForConditionalGeneration(cfg).eval()
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}, image_grid_pinpoints=pinpoints
    )
    proc = LlavaNextProcessor(
        image_processor=ip, tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )  # fmt: skip
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


BUILDERS = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "llava_onevision": tiny_onevision,
    "qwen2_vl": tiny_qwen2vl,
    "qwen2_5_vl": tiny_qwen25vl,
    "qwen3_vl": tiny_qwen3vl,
    "qwen3_vl_moe": tiny_qwen3vl_moe,
    "internvl": tiny_internvl,
    "smolvlm": tiny_smolvlm,
    "idefics3": tiny_idefics3,
    "gemma3": tiny_gemma3,
}


def prompt_text(family: str, n_images: int, words: str) -> str:
    image = IMAGE_PLACEHOLDER.get(family, "<image>")
    return f"USER: {' '.join([image] * n_images)} {words} ASSISTANT:"


def batch_images(family: str, n_images_per_row=(1, 1), sizes=((112, 112), (112, 168)), seed: int = 0):
    """The images of `batch_inputs`, one list per row: sizes cycle through `sizes` (the family's own where
    it has them; LLaVA-1.5 resizes every image, so it gets one size), seeds count up from `seed`."""
    rows = []
    for n in n_images_per_row:
        row = []
        for _ in range(n):
            family_sizes = IMAGE_SIZES.get(family, sizes)
            h, w = family_sizes[seed % len(family_sizes)] if family not in FIXED_SIZE else (112, 112)
            row.append(rand_image(h, w, seed))
            seed += 1
        rows.append(row)
    return rows


def process(family: str, proc, texts: list[str], images_per_row: list[list], **kwargs) -> dict:
    """The processor's tensors for row texts and their images (nested per row where the family wants it)."""
    images = images_per_row if family in NESTED_IMAGES else [im for row in images_per_row for im in row]
    return dict(proc(text=texts, images=images, return_tensors="pt", **kwargs))


def batch_inputs(family: str, proc, n_images_per_row=(1, 1), sizes=((112, 112), (112, 168))):
    """A left-padded batch: row texts of different lengths; images of different sizes (so different grids
    on Qwen, different AnyRes tilings on LLaVA-NeXT) except on LLaVA-1.5, which resizes every image."""
    words = ["describe the image please", "w1 w2 w3 w4 w5 w6 w7 w8 describe the image"]
    texts = [prompt_text(family, n, words[row % 2]) for row, n in enumerate(n_images_per_row)]
    return process(family, proc, texts, batch_images(family, n_images_per_row, sizes), padding=True)


def text_inputs(proc):
    return dict(proc.tokenizer(["USER: describe the image please ASSISTANT:"], return_tensors="pt"))


@torch.no_grad()
def _llava_next_counts(model, inputs) -> tuple[list[int], list[int]]:
    """The model's own packing; the newlines are its `image_newline` rows."""
    features = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
    ).pooler_output
    newline = model.model.image_newline
    counts = [int(f.shape[0]) for f in features]
    return counts, [n - int((f == newline).all(-1).sum()) for n, f in zip(counts, features)]


def _qwen_counts(model, inputs) -> tuple[list[int], list[int]]:
    counts = [int(t * h * w) // 4 for t, h, w in inputs["image_grid_thw"].tolist()]
    return counts, counts


def _llava_counts(model, inputs) -> tuple[list[int], list[int]]:
    n_images = inputs["pixel_values"].shape[0]
    n = int((inputs["input_ids"] == model.config.image_token_id).sum()) // n_images
    return [n] * n_images, [n] * n_images


# family -> (model, inputs) -> (LLM tokens per image, content tokens per image), computed from the model
# itself (not from tokprune), for the invariant tests' independent token counts. Content tokens are the
# ones that compete for the budget (all but separators such as LLaVA-NeXT's newline tokens).
IMAGE_COUNTS = {
    "llava": _llava_counts,
    "llava_next": _llava_next_counts,
    "llava_onevision": onevision_counts,
    "qwen2_vl": _qwen_counts,
    "qwen2_5_vl": _qwen_counts,
    "qwen3_vl": _qwen_counts,
    "qwen3_vl_moe": _qwen_counts,
    "internvl": internvl_counts,
    "smolvlm": smolvlm_counts,
    "idefics3": smolvlm_counts,
    "gemma3": gemma3_counts,
}


def image_counts(family: str, model, inputs) -> tuple[list[int], list[int]]:
    return IMAGE_COUNTS[family](model, inputs)
