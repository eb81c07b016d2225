"""Composition: a pre-LLM method, then an in-LLM method, in one `tokprune.apply` call.

What it shows: VisionZip cuts every image to `--pre-budget` tokens before the LLM, then FastV drops more
inside the LLM from layer `--layer` on, down to `--budget`. Each method counts its budget on the tokens
it receives; `pruner.stats.stages` reports every stage and `layer_tokens` what each LLM layer saw. The
list takes names, (name, options) pairs or method objects; at most one pre-LLM method, first, then in-LLM
methods in layer order (the script also shows the error a wrong order gets).

Run it (offline, CPU, a few seconds: the toy LLaVA shipped in the package, 196 visual tokens per image,
a 4-layer LLM):

    python examples/composition.py
    python examples/composition.py --pre-budget 64 --layer 1 --budget 16

On a real checkpoint (a local folder, or an HF id when you are online):

    python examples/composition.py --model llava-hf/llava-1.5-7b-hf --pre-budget 192 --budget 64
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from PIL import Image

import tokprune
from tokprune.errors import MethodOptionError
from tokprune.toy.model import load_toy, prompt
from tokprune.toy.task import generate
from tokprune.toy.train import HELD_OUT_SEED


def load(model_name: str | None) -> tuple[torch.nn.Module, Any]:
    """(model, processor): the shipped toy when no --model is given, else any supported HF checkpoint."""
    if model_name is None:
        return load_toy(attn="sdpa")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_name, dtype="auto", attn_implementation="sdpa")
    return model.eval(), AutoProcessor.from_pretrained(model_name)


def chat_prompt(processor: Any, question: str) -> str:
    if getattr(processor, "chat_template", None) is None:
        return prompt(question)  # the toy: "USER: <image> {question} ASSISTANT:"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local folder or HF id (default: the shipped toy)")
    parser.add_argument("--pre-budget", type=int, default=98, help="tokens per image VisionZip keeps")
    parser.add_argument("--layer", type=int, default=2, help="first LLM layer after FastV's drop")
    parser.add_argument("--budget", type=int, default=32, help="tokens per image FastV keeps")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 1 on the toy, 32 else")
    args = parser.parse_args()

    model, processor = load(args.model)
    max_new_tokens = args.max_new_tokens or (1 if args.model is None else 32)
    scene = generate(1, HELD_OUT_SEED)[0]
    inputs = processor(
        text=[chat_prompt(processor, scene.question)],
        images=[[Image.fromarray(scene.image)]],  # per prompt, as every processor takes them
        return_tensors="pt",
    ).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

    # A pair's own "budget" sets that method; apply()'s budget sets the last method (FastV here).
    methods = [("visionzip", {"budget": args.pre_budget}), ("fastv", {"layer": args.layer})]
    with torch.inference_mode(), tokprune.apply(model, methods, budget=args.budget) as pruner:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)

    stats = pruner.stats
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    print(f"question: {scene.question!r} -> {answer.strip()!r}")
    print(f"visual tokens in: {stats.visual_in[0]}")
    for stage in stats.stages:  # where: "pre" (before the LLM) or "llm@<first layer with fewer tokens>"
        print(f"stage {stage.method} ({stage.where}): kept {stage.visual_kept[0]}")
    print(f"tokens per LLM layer: {stats.layer_tokens[0]}")

    # The order is checked when the methods are installed: an in-LLM method cannot come first.
    try:
        tokprune.apply(model, ["fastv", "visionzip"])
    except MethodOptionError as error:
        print(f"refused as expected: {error}")


if __name__ == "__main__":
    main()
