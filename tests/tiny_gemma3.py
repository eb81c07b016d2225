"""Tiny, offline Gemma 3 (Gemma3ForConditionalGeneration) with random weights, and its processor.

SigLIP tower over 96 px images in 8 px patches (12 x 12 = 144 patches), average-pooled by the projector
to 6 x 6 = 36 tokens per image; a 4-layer Gemma 3 text model with both layer types (sliding, full,
sliding, full), two RoPE bases, and a sliding window of 24 slots, shorter than the prompts of the
tests, so that the window really cuts before and after pruning. The processor is the real
Gemma3Processor over the PIL image processor (torchvision is not installed), pan-and-scan off: every
image is resized to 96 x 96. `PAN_AND_SCAN` are the processor-call settings that turn it on for these small
images (crops of at least 32 px, up to 4 of them, from an aspect ratio of 1.2).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tokprune.bench.synthetic import WORDS

GEMMA3_IMAGE = "<start_of_image>"  # what a prompt holds per image; the processor expands it
IMAGE_SIZE, PATCH_SIZE, TOKENS_PER_IMAGE = 96, 8, 36
SLIDING_WINDOW = 24
# Gemma3Processor(...)(..., **PAN_AND_SCAN): the original view plus pan-and-scan crops, each resized to 96 x 96
PAN_AND_SCAN = dict(
    do_pan_and_scan=True,
    pan_and_scan_min_crop_size=32,
    pan_and_scan_max_num_crops=4,
    pan_and_scan_min_ratio_to_activate=1.2,
)
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def gemma3_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel tokenizer with Gemma 3's named image tokens (boi / eoi / image soft token), left padding."""
    names = {"boi_token": GEMMA3_IMAGE, "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=names,
    )
    tok.padding_side = "left"
    return tok


def gemma3_processor(tok: PreTrainedTokenizerFast):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    ip = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False)
    return Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=TOKENS_PER_IMAGE)


def tiny_gemma3(attn: str = "sdpa"):
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    tok = gemma3_tokenizer()
    vcfg = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    tcfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=1024,
        sliding_window=SLIDING_WINDOW,
        layer_types=list(LAYER_TYPES),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.2,
    )
    cfg = Gemma3Config(
        vision_config=vcfg,
        text_config=tcfg,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )
    cfg._attn_implementation = attn
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # Gemma 3 initialises the projection to zeros: every image would be the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
    return model, gemma3_processor(tok)


def gemma3_counts(model, inputs) -> tuple[list[int], list[int]]:
    """LLM tokens per image from the model itself: the projector's pooled features of each image."""
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (n, T, D)
    counts = [int(features.shape[1])] * int(features.shape[0])
    return counts, counts
