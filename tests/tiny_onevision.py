"""A tiny LLaVA-OneVision (SigLIP tower + Qwen2 LLM, as in the real checkpoints) built in code, and its inputs.

Tiles are 56 px of 8 px patches: 7x7 = 49 tokens per tile (an odd side, like the real 384/14 = 27, so the
2x2 video pooling rounds up: 4x4 = 16 tokens per frame). Grid pinpoints up to 112x168 and
`vision_aspect_ratio="anyres_max_4"` make the two image sizes of `tiny_models.batch_inputs` take both packing
paths: a 112x112 image is 2x2 tiles (14x14 tokens, no interpolation), a 112x168 image is 2x3 tiles whose
14x21 grid exceeds 1.1 x 4 tiles and is bilinearly downsampled to 11x17 by `pack_image_features`.

Videos: `LlavaOnevisionVideoProcessor` needs torchvision (not installed), so the processor subclass below
preprocesses frames itself the way that processor does by default — resize every frame to the tile size
(bicubic), rescale by 1/255, normalise with the CLIP mean/std — into `pixel_values_videos` of shape
(n_videos, frames, 3, 56, 56), and lets the real `replace_video_token` expand each `<video>` placeholder
(frames x 16 + 1 tokens).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tokprune.bench.synthetic import make_tokenizer, rand_image

TILE, PATCH = 56, 8
PINPOINTS = [[56, 112], [112, 56], [112, 112], [112, 168]]
ASPECT = "anyres_max_4"
VIDEO = "<video>"


def onevision_processor(tokenizer):
    """LlavaOnevisionProcessor with the PIL image processor and torchvision-free video preprocessing."""
    from transformers import (
        BatchFeature,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        ProcessorMixin,
    )

    class LlavaOnevisionTinyProcessor(LlavaOnevisionProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.num_image_tokens = (TILE // PATCH) ** 2
            self.vision_feature_select_strategy = "full"
            self.vision_aspect_ratio = ASPECT
            self.image_token, self.video_token = "<image>", VIDEO
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.video_processor = None  # videos go through _process_videos below

        def _process_videos(self, videos, **kwargs):
            """videos: list of clips, each a list of PIL frames of one size -> pixel_values_videos."""
            ip = self.image_processor
            clips = [
                np.stack([_frame(f, TILE, ip.image_mean, ip.image_std) for f in clip]) for clip in videos
            ]
            processed = BatchFeature({"pixel_values_videos": torch.from_numpy(np.stack(clips))})
            replacements = [self.replace_video_token(processed, video_idx=i) for i in range(len(clips))]
            return processed, replacements

    ip = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    return LlavaOnevisionTinyProcessor(image_processor=ip, tokenizer=tokenizer)


def _frame(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """(3, size, size) float32: bicubic resize, 1/255, CLIP normalisation (the video processor's defaults)."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return pixels.transpose(2, 0, 1)


def tiny_onevision(attn: str = "sdpa"):
    """LlavaOnevisionForConditionalGeneration: 3-layer SigLIP (no [CLS], strategy 'full', last layer feeds the
    projector as in llava-hf/llava-onevision-qwen2-*-ov-hf) and a 4-layer Qwen2 LLM."""
    from tiny_models import _text_config
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    tok = make_tokenizer(["<image>", VIDEO])
    vcfg = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=TILE,
        patch_size=PATCH, vision_use_head=False,
    )  # fmt: skip
    cfg = LlavaOnevisionConfig(
        vision_config=vcfg, text_config=Qwen2Config(**_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids(VIDEO),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio=ASPECT,
    )  # fmt: skip
    cfg._attn_implementation = attn
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    return model, onevision_processor(tok)


def rand_clip(frames: int, seed: int, h: int = 64, w: int = 80) -> list[Image.Image]:
    return [rand_image(h, w, seed * 100 + f) for f in range(frames)]


@torch.no_grad()
def onevision_counts(model, inputs) -> tuple[list[int], list[int]]:
    """Per image (image order) LLM tokens and content tokens, from the model's own packing: the newline
    tokens are the rows equal to `image_newline`."""
    features = model.model.get_image_features(
        pixel_values=inputs["pixel_values"],
        image_sizes=inputs["image_sizes"],
        batch_num_images=inputs.get("batch_num_images"),
    ).pooler_output
    newline = model.model.image_newline
    counts = [int(f.shape[0]) for f in features]
    return counts, [n - int((f == newline).all(-1).sum()) for n, f in zip(counts, features)]


@torch.no_grad()
def onevision_video_counts(model, inputs) -> tuple[list[int], list[int]]:
    """Per video, LLM tokens and content tokens (all but the `image_newline` rows), from the model."""
    features = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output
    newline = model.model.image_newline
    return [int(f.shape[0]) for f in features], [int((f != newline).any(-1).sum()) for f in features]


# batches of two left-padded rows, each ending in at least 4 text tokens (the tests compare that tail):
# "mixed" puts a video before an image in row 0 and after one in row 1 (the model scatters all images, then
# all videos); "multi" gives row 0 two images (base views only, as the model does for several images) and
# row 1 one AnyRes image
VIDEO_LAYOUTS = {
    "mixed": (
        ["USER: <video> w1 w2 <image> describe the image ASSISTANT:", "USER: <image> w3 w4 w5 w6 <video> describe the image please ASSISTANT:"],
        [(112, 112), (112, 168)],
        2,
    ),
    "multi": (
        ["USER: <image> <image> describe the image ASSISTANT:", "USER: <image> w1 w2 w3 w4 w5 describe the image please ASSISTANT:"],
        [[(112, 168), (112, 112)], [(112, 168)]],
        0,
    ),
}  # fmt: skip


def onevision_batch(proc, layout: str, frames: int = 3) -> dict:
    """The inputs of one VIDEO_LAYOUTS entry (clips of `frames` frames)."""
    texts, sizes, n_videos = VIDEO_LAYOUTS[layout]
    seeds = iter(range(100))
    images = [
        [rand_image(h, w, next(seeds)) for h, w in row]
        if isinstance(row, list)
        else rand_image(*row, next(seeds))
        for row in sizes
    ]
    videos = [rand_clip(frames, seed) for seed in range(n_videos)] or None
    return dict(proc(text=texts, images=images, videos=videos, return_tensors="pt", padding=True))
