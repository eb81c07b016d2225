"""A method of your own: subclass `tokprune.methods.Method`, write `select`, apply it.

What it shows: `ClsExplore`, a small pre-LLM method. It keeps most of each image's budget by the ViT's
[CLS] attention (the `cls_attention` signal, computed by tokprune without eager attention; on towers
without [CLS], such as Qwen's, it is the attention each token receives) and spends the fraction
`explore` on tokens spread evenly over the rest of the image. A method is a dataclass: its fields are
its options (checked in `__post_init__`), its class attributes describe it, and `select(image, k)` returns
a `Selection` of exactly k sorted token indices. The engine does everything else (masks, positions,
batches, caches), so the method works on every supported model family.

The script applies it as an object, `tokprune.apply(model, ClsExplore(explore=0.5), budget=...)`, registers
it to use it by name, and checks two of the project's invariants on the spot: `keep_ratio=1.0` gives the
unpatched model's logits bit for bit, and leaving the `with` block restores them. (tests/test_examples.py
runs it through the whole invariant matrix, as every registered method is.)

Run it (offline, CPU, a few seconds, on the toy LLaVA shipped in the package):

    python examples/custom_method.py
    python examples/custom_method.py --explore 0.5 --budget 32
    python examples/custom_method.py --model llava-hf/llava-1.5-7b-hf   # a local folder or an HF id
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

import tokprune
from tokprune.core.budget import Budget
from tokprune.errors import MethodOptionError
from tokprune.methods import REGISTRY, ImageTokens, Method, Selection
from tokprune.methods.base import topk_sorted
from tokprune.methods.options import check_number
from tokprune.toy.model import load_toy, prompt
from tokprune.toy.task import generate
from tokprune.toy.train import HELD_OUT_SEED


@dataclass
class ClsExplore(Method):
    """Top [CLS]-attention tokens, plus a share `explore` of the budget spread evenly over the others.

    explore: the fraction of the k kept tokens chosen by position instead of attention, in [0, 1)
        (0 is FasterVLM's rule). Default budget: keep 1/4 of every image.
    """

    # class attributes: what the registry, `tokprune methods` and the engine read
    name = "cls_explore"
    family = "[CLS] attention"
    where = "pre"  # before the LLM (LLMMethod subclasses act inside it)
    signals = ("cls_attention",)  # what select() finds in image.signals, one value per token
    default_budget = Budget(ratio=0.25)
    paper = "example (examples/custom_method.py)"

    explore: float = 0.25  # an option: a dataclass field with its default

    def __post_init__(self) -> None:
        check_number(self, "explore", 0, 1, high_open=True)  # a bad value fails when the method is made

    def select(self, image: ImageTokens, k: int) -> Selection:
        """Keep k of the image's image.n tokens (the engine only asks for 0 < k < image.n)."""
        n_explore = int(self.explore * k)
        top = topk_sorted(image.signals["cls_attention"], k - n_explore)  # (k - n_explore,) ascending
        if n_explore == 0:
            return Selection(keep=top)
        others = torch.ones(image.n, dtype=torch.bool, device=top.device)
        others[top] = False
        others = others.nonzero().squeeze(1)  # the tokens not taken yet, ascending
        # n_explore evenly spaced indices into `others` (distinct, since others has more than n_explore)
        spread = others[torch.arange(n_explore, device=top.device) * others.numel() // n_explore]
        return Selection(keep=torch.cat([top, spread]).sort().values)


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
    parser.add_argument("--explore", type=float, default=0.25, help="share of the budget spread evenly")
    parser.add_argument("--budget", type=int, default=48, help="visual tokens kept per image")
    args = parser.parse_args()

    model, processor = load(args.model)
    scene = generate(1, HELD_OUT_SEED)[0]
    inputs = processor(
        text=[chat_prompt(processor, scene.question)],
        images=[[Image.fromarray(scene.image)]],  # per prompt, as every processor takes them
        return_tensors="pt",
    ).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

    with torch.inference_mode():
        unpatched = model(**inputs).logits

        # 1. as an object: no registration needed
        method = ClsExplore(explore=args.explore)
        with tokprune.apply(model, method, budget=args.budget) as pruner:
            pruned = model(**inputs).logits[0, -1]
        stats = pruner.stats
        print(f"{method}: visual tokens in: {stats.visual_in[0]}, kept: {stats.visual_kept[0]}")
        print(f"kept token indices: {stats.kept[0].tolist()}")
        print(f"answer: {processor.tokenizer.decode(int(pruned.argmax()))!r} (expected {scene.answer!r})")

        # 2. by name, once registered (as the built-in methods are, in tokprune/methods/__init__.py)
        REGISTRY[ClsExplore.name] = ClsExplore
        with tokprune.apply(model, "cls_explore", keep_ratio=0.5, explore=0.5) as pruner:
            model(**inputs)
        print(f"by name: cls_explore keeps {pruner.stats.visual_kept[0]} of {pruner.stats.visual_in[0]}")
        print(f"registered: {'cls_explore' in tokprune.available_methods()}")

        # 3. two invariants every method must pass (the test suite checks all of them)
        with tokprune.apply(model, ClsExplore(), keep_ratio=1.0):
            keep_all = model(**inputs).logits
        print(f"keep_ratio=1.0 identical to the unpatched model: {torch.equal(keep_all, unpatched)}")
        print(f"restored after the with block: {torch.equal(model(**inputs).logits, unpatched)}")

    try:  # options are checked when the method is made
        ClsExplore(explore=1.5)
    except MethodOptionError as error:
        print(f"refused as expected: {error}")


if __name__ == "__main__":
    main()
