"""Multi-turn chat on a reused KV cache: each turn prunes only the images it brings.

What it shows: three turns of one conversation under one `tokprune.apply(...)`. Turn 1 brings an image
and a question; turn 2 asks about the same image (text only); turn 3 brings a second image. Every turn
after the first passes only its *new* tokens, the attention mask of the whole unpruned conversation and
the cache of the previous turn; the cache keeps the earlier turns as they were pruned, and
`pruner.stats` describes the newest turn's own images.

The cache is passed as `cache=` and read as `out.cache`: transformers 5.24 renamed the KV-cache argument
and output field; `past_key_values=` / `out.past_key_values` still work there but are deprecated (they
print a warning and go in a later release). On transformers 5.20-5.23 use the old names.

Run it (offline, CPU, a few seconds: the toy LLaVA shipped in the package, which was trained on several
questions per scene, so turn 2 gets a real answer):

    python examples/multiturn.py
    python examples/multiturn.py --method fastv --budget 32

On a real checkpoint (a local folder, or an HF id when you are online):

    python examples/multiturn.py --model llava-hf/llava-1.5-7b-hf --max-new-tokens 32
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
    return model.eval(), AutoProcessor.from_pretrained(model_name)


class Chat:
    """The conversation so far, as messages, and the text of each new turn in the model's format."""

    def __init__(self, processor: Any) -> None:
        self.messages: list = []  # the toy: prompt texts; else chat messages for the template
        self.processor = processor

    def new_turn(self, question: str, n_images: int) -> str:
        """The text this user turn adds to the conversation (the generation prompt included)."""
        templated = getattr(self.processor, "chat_template", None) is not None
        if not templated:  # the toy: plain LLaVA-1.5 text, the format it was trained on
            first = not self.messages
            user = "USER: " + "<image> " * n_images if first or n_images else ""  # a follow-up may skip it
            self.messages.append(f"{user}{question} ASSISTANT:")
            return self.messages[-1] if first else " " + self.messages[-1]
        before = self._render(add_generation_prompt=False) if self.messages else ""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        self.messages.append({"role": "user", "content": content})
        return self._render(add_generation_prompt=True)[len(before) :]  # what the template adds

    def answered(self, answer: str) -> None:
        """Record the model's answer (the template renders it into the next turn's prefix)."""
        if getattr(self.processor, "chat_template", None) is not None:
            self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})

    def _render(self, add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            self.messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local folder or HF id (default: the shipped toy)")
    parser.add_argument("--method", default="divprune", help="one of tokprune.available_methods()")
    parser.add_argument("--budget", type=int, default=48, help="visual tokens kept per image")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 1 on the toy, 32 else")
    args = parser.parse_args()

    model, processor = load(args.model)
    max_new_tokens = args.max_new_tokens or (1 if args.model is None else 32)
    first, second = generate(2, HELD_OUT_SEED)  # two held-out scenes
    colours = [colour for colour, *_ in first.objects]
    colour = next(c for c in colours if colours.count(c) == 1)  # objects have distinct pairs, not colours
    follow_up = f"what shape is the {colour} object ?"  # about the first image again
    turns = [  # (question, new images)
        (first.question, [Image.fromarray(first.image)]),
        (follow_up, []),
        (second.question, [Image.fromarray(second.image)]),
    ]

    chat = Chat(processor)
    cache, mask, last = None, None, None  # the KV cache, the whole conversation's mask, the last token
    with torch.inference_mode(), tokprune.apply(model, args.method, budget=args.budget) as pruner:
        for number, (question, images) in enumerate(turns, start=1):
            text = chat.new_turn(question, len(images))
            # later turns: no BOS token, they continue the conversation
            batch = processor(
                text=[text],
                images=[images] if images else None,
                return_tensors="pt",
                add_special_tokens=number == 1,
            ).to(model.device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if images:
                inputs["pixel_values"] = batch["pixel_values"].to(model.dtype)
            if cache is not None:
                # the last generated token is not in the cache yet: it goes in with the new turn, and the
                # mask spans the whole unpruned conversation (generate derives positions from it)
                inputs["input_ids"] = torch.cat([last, inputs["input_ids"]], dim=1)
                inputs["attention_mask"] = torch.cat([mask, inputs["attention_mask"]], dim=1)
                inputs["cache"] = cache
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True
            )
            new = out.sequences[:, inputs["input_ids"].shape[1] :]
            answer = processor.batch_decode(new, skip_special_tokens=True)[0].strip()
            chat.answered(answer)
            cache, last = out.cache, out.sequences[:, -1:]
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1)

            # the cache of every LLM layer: in-LLM methods (fastv, ...) shorten only the layers they act on
            lengths = [cache.get_seq_length(i) for i in range(len(cache.layers))]
            print(f"turn {number}: {question!r} -> {answer!r}")
            print(f"turn {number}: new images: {len(images)}, cache length per layer: {lengths}")
            if images:  # stats describe the latest turn that brought images (text-only turns prune nothing)
                stats = pruner.stats
                print(f"turn {number}: visual tokens in: {stats.visual_in[0]}, kept: {stats.visual_kept[0]}")
    print(f"method: {args.method}, budget: {args.budget} per image")


if __name__ == "__main__":
    main()
