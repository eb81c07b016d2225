"""Video: prune the visual tokens of a clip on Qwen2-VL, per frame or per clip.

What it shows: for video, `budget` counts tokens **per frame** by default (`video_budget="frame"`: a clip
of t frames keeps min(budget * t, n) of its n tokens); `video_budget="clip"` counts it per clip instead.
On Qwen2-VL a "frame" is one temporal slice of the clip (2 video frames merged by the ViT), of
(H/28) x (W/28) LLM tokens.

The toy model shipped in the package is a LLaVA-1.5, which takes no video. So, by default, this script
builds a **tiny Qwen2-VL with random weights** from a config (no download) and lays the clip out by hand
as Qwen2-VL's video processor would (that processor needs torchvision). Its generated tokens are
meaningless: the point is the API and the token counts, not the answer.

Run it (offline, CPU, a few seconds):

    python examples/video.py
    python examples/video.py --method fastv --budget 8

On a real Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA-OneVision checkpoint (a local folder, or an HF id when
you are online; its video processor needs torchvision):

    python examples/video.py --model Qwen/Qwen2-VL-2B-Instruct --max-new-tokens 32
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

import tokprune

# the tiny model's special tokens (a real checkpoint's tokenizer defines its own)
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 60, 61, 62, 63
# Qwen2-VL: 14 px patches, 2x2 of them merged into one LLM token, 2 video frames per temporal slice
PATCH, MERGE, TEMPORAL = 14, 2, 2
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def tiny_qwen2_vl() -> torch.nn.Module:
    """A Qwen2VLForConditionalGeneration with random weights: 2 ViT blocks, a 4-layer 64-wide LLM."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    vision = {
        "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2,
        "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL,
    }  # fmt: skip
    text = {
        "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }  # fmt: skip
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return Qwen2VLForConditionalGeneration(config).eval()  # sdpa attention, transformers' default


def moving_square(frames: int, size: int) -> np.ndarray:
    """(frames, size, size, 3) uint8: a red square crossing a grey background."""
    clip = np.full((frames, size, size, 3), 128, dtype=np.uint8)
    for i in range(frames):
        x = i * (size - 24) // max(frames - 1, 1)
        clip[i, size // 2 - 12 : size // 2 + 12, x : x + 24] = (220, 40, 40)
    return clip


def clip_inputs(clip: np.ndarray) -> dict[str, torch.Tensor]:
    """The model inputs of one prompt holding the clip, laid out as Qwen2-VL's processors do."""
    # pixel_values_videos: normalised frames cut into (TEMPORAL x PATCH x PATCH) patches, the patches of
    # each 2x2 merge block next to each other; video_grid_thw: (slices, patch rows, patch columns)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    video = (torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255 - mean) / std  # (T, 3, H, W)
    frames, channels, height, width = video.shape
    t, h, w = frames // TEMPORAL, height // PATCH, width // PATCH
    patches = video.reshape(t, TEMPORAL, channels, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, -1)
    # the prompt: some text, <|vision_start|>, one <|video_pad|> per LLM token, <|vision_end|>, more text
    n_tokens = t * h * w // MERGE**2
    ids = [1, *range(3, 9), VISION_START, *[VIDEO_PAD] * n_tokens, VISION_END, *range(9, 13)]
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": 2 * (input_ids == VIDEO_PAD).long(),  # 1 marks image tokens, 2 video tokens
        "pixel_values_videos": patches,
        "video_grid_thw": torch.tensor([[t, h, w]]),
    }


def load_real(model_name: str, clip: np.ndarray) -> tuple[torch.nn.Module, Any, dict]:
    """(model, processor, inputs) of a real video-capable checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_name, dtype="auto", attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(model_name)
    content = [{"type": "video"}, {"type": "text", "text": "What moves in this video?"}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[text], videos=[clip], return_tensors="pt").to(model.device)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
    return model.eval(), processor, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="local folder or HF id (default: a tiny random Qwen2-VL)"
    )
    parser.add_argument("--method", default="visionzip", help="one of tokprune.available_methods()")
    parser.add_argument("--budget", type=int, default=4, help="visual tokens kept per frame (or per clip)")
    parser.add_argument("--frames", type=int, default=8, help="video frames (an even number)")
    parser.add_argument("--size", type=int, default=112, help="frame side in pixels (a multiple of 28)")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    args = parser.parse_args()

    clip = moving_square(args.frames, args.size)
    if args.model is None:
        print("NOTE: a tiny Qwen2-VL with RANDOM weights (the shipped toy takes no video): the generated")
        print("NOTE: tokens mean nothing; this shows the API and the token counts, not an answer.")
        model, processor, inputs = tiny_qwen2_vl(), None, clip_inputs(clip)
        # random weights could emit vision tokens, which would make a second clip out of the output
        extra = {"suppress_tokens": [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]}
    else:
        model, processor, inputs = load_real(args.model, clip)
        extra = {}

    for video_budget in ("frame", "clip"):
        with (
            torch.inference_mode(),
            tokprune.apply(model, args.method, budget=args.budget, video_budget=video_budget) as pruner,
        ):
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, **extra)
        new = out[:, inputs["input_ids"].shape[1] :]
        answer = processor.batch_decode(new, skip_special_tokens=True)[0] if processor else new[0].tolist()
        slices = int(inputs["video_grid_thw"][0, 0]) if "video_grid_thw" in inputs else None
        stats = pruner.stats
        print(
            f"video_budget={video_budget!r}: frames (temporal slices): {slices}, budget: {args.budget}, "
            f"visual tokens in: {stats.visual_in[0]}, kept: {stats.visual_kept[0]}, output: {answer!r}"
        )
    print(f"method: {args.method}")


if __name__ == "__main__":
    main()
