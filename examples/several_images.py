"""Several images per prompt, and a batch of prompts with different numbers of images.

What it shows: `budget` counts visual tokens **per image**. Row 0 of the batch holds two images, row 1
one image; with `budget=B` row 0 keeps 2·B visual tokens and row 1 keeps B, and tokprune re-packs the
ragged rows (left padding) so that `generate()` works on the whole batch at once.

Run it (offline, CPU, a few seconds: the toy LLaVA shipped in the package, scenes of its toy task):

    python examples/several_images.py
    python examples/several_images.py --method divprune --budget 16

On a real checkpoint (a local folder, or an HF id when you are online):

    python examples/several_images.py --model llava-hf/llava-1.5-7b-hf --max-new-tokens 32
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from PIL import Image

import tokprune
from tokprune.toy.model import load_toy
from tokprune.toy.task import generate
from tokprune.toy.train import HELD_OUT_SEED


def load(model_name: str | None) -> tuple[torch.nn.Module, Any]:
    """(model, processor): the shipped toy when no --model is given, else any supported HF checkpoint."""
    if model_name is None:
        return load_toy(attn="sdpa")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_name, dtype="auto", attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(model_name)
    processor.tokenizer.padding_side = "left"  # batched generation pads on the left
    return model.eval(), processor


def chat_prompt(processor: Any, n_images: int, question: str) -> str:
    """The prompt text for `n_images` images followed by a question, in the model's own format."""
    if getattr(processor, "chat_template", None) is None:  # the toy: plain LLaVA-1.5 format
        return "USER: " + "<image> " * n_images + f"{question} ASSISTANT:"
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local folder or HF id (default: the shipped toy)")
    parser.add_argument("--method", default="visionzip", help="one of tokprune.available_methods()")
    parser.add_argument("--budget", type=int, default=32, help="visual tokens kept per image")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 1 on the toy, 32 else")
    args = parser.parse_args()

    model, processor = load(args.model)
    max_new_tokens = args.max_new_tokens or (1 if args.model is None else 32)
    scenes = generate(3, HELD_OUT_SEED)  # three held-out scenes of the toy task
    images = [Image.fromarray(s.image) for s in scenes]
    rows = [images[:2], images[2:]]  # row 0: two images, row 1: one image
    texts = [chat_prompt(processor, 2, scenes[1].question), chat_prompt(processor, 1, scenes[2].question)]

    # images per prompt, in prompt order; the processor matches them to the placeholders
    inputs = processor(text=texts, images=rows, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

    with torch.inference_mode(), tokprune.apply(model, args.method, budget=args.budget) as pruner:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)

    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    stats = pruner.stats
    print(f"method: {args.method}, budget: {args.budget} per image")
    for row, (row_images, answer) in enumerate(zip(rows, answers)):
        print(
            f"row {row}: images: {len(row_images)}, visual tokens in: {stats.visual_in[row]}, "
            f"kept: {stats.visual_kept[row]}, answer: {answer.strip()!r}"
        )


if __name__ == "__main__":
    main()
