"""The toy VLM: a small LlavaForConditionalGeneration (CLIP-style ViT with [CLS], Llama-style LLM).

112x112 images in 8x8 patches: 196 visual tokens per image. The trained weights ship in
`tokprune/toy/weights/` (config, safetensors, tokenizer and processor files); `load_toy()` reads them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tokprune.bench.synthetic import llava_processor, make_tokenizer
from tokprune.toy.task import SIZE, vocabulary

WEIGHTS = Path(__file__).parent / "weights"
PATCH = 8
N_VISUAL = (SIZE // PATCH) ** 2  # 196
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def toy_processor():
    """LlavaProcessor with the toy's word-level tokenizer and a 112 px CLIP image processor."""
    tok = make_tokenizer(["<image>"], words=["USER:", "ASSISTANT:", *vocabulary()], split_punctuation=False)
    return llava_processor(tok, SIZE, PATCH, image_mean=CLIP_MEAN.tolist(), image_std=CLIP_STD.tolist())


def toy_config(processor):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        image_size=SIZE, patch_size=PATCH, projection_dim=128,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=N_VISUAL, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip


def prompt(question: str) -> str:
    return f"USER: <image> {question} ASSISTANT:"


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """(N, 112, 112, 3) uint8 -> (N, 3, 112, 112) float32, normalised exactly as the toy processor does."""
    x = (images.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def load_toy(path: str | Path = WEIGHTS, attn: str = "sdpa"):
    """(model, processor) of the trained toy VLM, offline."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no trained toy weights in {path}; train them: python -m tokprune.toy.train")
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn).eval()
    return model, LlavaProcessor.from_pretrained(path)


def toy_with_inputs(attn: str = "sdpa", dtype=torch.float32, device: str = "cpu"):
    """(model, make_inputs(batch_size)) of the shipped toy, whose inputs are held-out scenes of its task
    (what `tokprune robustness --model toy` measures on)."""
    from PIL import Image

    from tokprune.toy.task import generate
    from tokprune.toy.train import HELD_OUT_SEED

    model, processor = load_toy(attn=attn)
    model = model.to(device=device, dtype=dtype)

    def make_inputs(batch_size: int = 1) -> dict:
        samples = generate(batch_size, HELD_OUT_SEED)
        batch = processor(
            text=[prompt(s.question) for s in samples], images=[Image.fromarray(s.image) for s in samples],
            return_tensors="pt", padding=True,
        )  # fmt: skip
        return {
            k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
            for k, v in batch.items()
        }

    return model, make_inputs
