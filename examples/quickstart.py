"""Quick start: prune the visual tokens of one image with VisionZip and generate an answer.

What it shows: the README's quick start, complete - load a model and its processor, build a prompt with
one image, run `model.generate()` inside `tokprune.apply(...)`, and read `pruner.stats` (visual tokens in
and kept, tokens each LLM layer saw, scoring time).

Run it (offline, CPU, a few seconds: the small trained LLaVA shipped in the package, 196 visual tokens
per image, and a scene of its toy VQA task):

    python examples/quickstart.py
    python examples/quickstart.py --method divprune --budget 32

On a real checkpoint (a local folder, or an HF id when you are online), optionally with your own image:

    python examples/quickstart.py --model llava-hf/llava-1.5-7b-hf --image cat.jpg \
        --question "What is in the picture?" --max-new-tokens 32
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from PIL import Image

import tokprune
from tokprune.toy.model import load_toy, prompt
from tokprune.toy.task import generate
from tokprune.toy.train import HELD_OUT_SEED


def load(model_name: str | None) -> tuple[torch.nn.Module, Any]:
    """(model, processor): the shipped toy when no --model is given, else any supported HF checkpoint."""
    if model_name is None:
        return load_toy(attn="sdpa")  # offline: the weights are part of the package
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_name, dtype="auto", attn_implementation="sdpa")
    return model.eval(), AutoProcessor.from_pretrained(model_name)


def chat_prompt(processor: Any, question: str) -> str:
    """The prompt text for one image and a question, in the model's own format."""
    if getattr(processor, "chat_template", None) is None:
        return prompt(question)  # the toy has no chat template: "USER: <image> {question} ASSISTANT:"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local folder or HF id (default: the shipped toy)")
    parser.add_argument("--image", default=None, help="an image file (default: a scene of the toy task)")
    parser.add_argument("--question", default=None, help="default: the toy scene's question")
    parser.add_argument("--method", default="visionzip", help="one of tokprune.available_methods()")
    parser.add_argument("--budget", type=int, default=64, help="visual tokens kept per image")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 1 on the toy, 32 else")
    args = parser.parse_args()

    model, processor = load(args.model)
    # the toy's answers are one word of its vocabulary; a real model needs a few more tokens
    max_new_tokens = args.max_new_tokens or (1 if args.model is None else 32)
    scene = generate(1, HELD_OUT_SEED)[0]  # a held-out scene: image, question, answer
    image = Image.open(args.image).convert("RGB") if args.image else Image.fromarray(scene.image)
    question = args.question or scene.question

    inputs = processor(text=[chat_prompt(processor, question)], images=[[image]], return_tensors="pt")
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

    # Everything inside the `with` block runs pruned; leaving it restores the unmodified model.
    with torch.inference_mode(), tokprune.apply(model, args.method, budget=args.budget) as pruner:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)

    prompt_length = inputs["input_ids"].shape[1]
    answer = processor.batch_decode(out[:, prompt_length:], skip_special_tokens=True)[0]
    stats = pruner.stats  # describes the prefill (decode steps never prune)
    print(f"question: {question}")
    if not args.image and not args.question:
        print(f"expected answer: {scene.answer}")
    print(f"answer: {answer.strip()}")
    print(f"method: {args.method}, budget: {args.budget}")
    print(f"visual tokens in: {stats.visual_in[0]}, kept: {stats.visual_kept[0]}")
    print(f"tokens per LLM layer: {stats.layer_tokens[0]}")
    print(f"scoring time: {stats.scoring_seconds * 1000:.1f} ms")


if __name__ == "__main__":
    main()
