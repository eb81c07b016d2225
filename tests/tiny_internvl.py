"""A tiny InternVLForConditionalGeneration (random weights) and its processor, built offline in code.

InternViT with a [CLS] token (qk-norm on, to exercise that path): 112 px tiles of 8x8 patches; pixel
shuffle (downsample_ratio 0.5) makes 4x4 = 16 LLM tokens per tile. The processor is the real
`InternVLProcessor` over the PIL `GotOcr2ImageProcessorPil` (1..4 tiles, plus a thumbnail when an image
has more than one tile); its `__init__` is replaced because it requires a video processor, whose base
class needs torchvision (not installed). The tokenizer carries the attributes the processor reads
(`<img>`, `<IMG_CONTEXT>`, `</img>`, `<video>`).
"""

from __future__ import annotations

import itertools
import re

import torch

from tokprune.bench.synthetic import make_tokenizer

INTERNVL_SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
TILE = 112  # px per tile (= the ViT's image size)
PATCH = 14
TILE_TOKENS = (TILE // PATCH // 2) ** 2  # LLM tokens per tile after the 2x2 pixel shuffle


def internvl_tokenizer():
    tok = make_tokenizer(INTERNVL_SPECIALS)
    tok.start_image_token, tok.end_image_token, tok.context_image_token, tok.video_token = INTERNVL_SPECIALS
    ids = [tok.convert_tokens_to_ids(t) for t in INTERNVL_SPECIALS]
    tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id = ids[:3]
    return tok


def internvl_processor(tok, max_patches: int = 4):
    """InternVLProcessor for images only (no video processor: it needs torchvision)."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor, ProcessorMixin

    class InternVLImageOnlyProcessor(InternVLProcessor):
        def __init__(
            self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs
        ):
            self.image_seq_length = image_seq_length
            self.start_image_token, self.end_image_token = (
                tokenizer.start_image_token,
                tokenizer.end_image_token,
            )
            self.start_image_token_id = tokenizer.start_image_token_id
            self.end_image_token_id = tokenizer.end_image_token_id
            self.image_token, self.video_token = tokenizer.context_image_token, tokenizer.video_token
            self.image_token_id = tokenizer.context_image_token_id
            self.multimodal_pattern = re.compile(
                f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
            )
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ip = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1, max_patches=max_patches
    )
    return InternVLImageOnlyProcessor(image_processor=ip, tokenizer=tok, image_seq_length=TILE_TOKENS)


def tiny_internvl(attn: str = "sdpa"):
    from tiny_models import _text_config
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    tok = internvl_tokenizer()
    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=[TILE, TILE], patch_size=[PATCH, PATCH], use_qk_norm=True,
    )  # fmt: skip
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=dict(model_type="qwen2", **_text_config(tok)),
        image_token_id=tok.context_image_token_id,
        image_seq_length=TILE_TOKENS,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    cfg._attn_implementation = attn
    model = InternVLForConditionalGeneration(cfg).eval()
    return model, internvl_processor(tok)


def image_token_runs(input_ids: torch.Tensor, token_id: int) -> list[int]:
    """Lengths of the runs of `token_id` in every row, row by row (plain Python, independent of tokprune)."""
    return [
        len(list(run)) for row in input_ids.tolist() for key, run in itertools.groupby(row) if key == token_id
    ]


@torch.no_grad()
def internvl_counts(model, inputs) -> tuple[list[int], list[int]]:
    """Tokens per image = its `<img>...</img>` run of context tokens; checked against the features the
    model computes for all tiles. Every token is content (no separators)."""
    counts = image_token_runs(inputs["input_ids"], model.config.image_token_id)
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert sum(counts) == features.shape[0] * features.shape[1]
    return counts, counts
