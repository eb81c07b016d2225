"""Train the toy VLM on the procedural task (deterministic; CPU or GPU).

    python -m tokprune.toy.train --steps 6000 --out tokprune/toy/weights

Loss = cross-entropy of the one-word answer at the last prompt position + `aux_weight` x a [CLS]
auxiliary objective: from the ViT's pooled [CLS] output, predict which of the 12 colour-shape pairs are
in the scene (binary cross-entropy). The auxiliary head gives [CLS] a reason to attend to the objects, as
CLIP's contrastive objective does for real models; it is dropped after training.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tokprune.toy.model import N_VISUAL, WEIGHTS, pixel_values, toy_config, toy_processor
from tokprune.toy.task import generate, presence_labels

TRAIN_SEED = 1
HELD_OUT_SEED = 10**6


def encode(processor, samples, device) -> dict:
    """Model inputs for samples without going through PIL (identical to the processor's output)."""
    tok = processor.tokenizer
    texts = [f"USER: {'<image>' * N_VISUAL} {s.question} ASSISTANT:" for s in samples]
    batch = tok(texts, return_tensors="pt", padding=True)
    batch["pixel_values"] = pixel_values(np.stack([s.image for s in samples]))
    return {k: v.to(device) for k, v in batch.items()}


def answer_ids(processor, samples, device) -> torch.Tensor:
    return torch.tensor([processor.tokenizer.convert_tokens_to_ids(s.answer) for s in samples], device=device)


@torch.no_grad()
def accuracy(model, processor, samples, batch_size: int = 100) -> float:
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        logits = model(**encode(processor, chunk, device), logits_to_keep=1).logits[:, -1]
        correct += int((logits.argmax(-1) == answer_ids(processor, chunk, device)).sum())
    return correct / len(samples)


def train(steps: int, batch_size: int, lr: float, aux_weight: float, device: str, log_every: int = 200):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    processor = toy_processor()
    model = LlavaForConditionalGeneration(toy_config(processor)).to(device)
    model.config._attn_implementation = "sdpa"
    aux_head = nn.Linear(model.config.vision_config.hidden_size, 12).to(device)
    pooled = {}
    hook = model.model.vision_tower.register_forward_hook(
        lambda m, a, out: pooled.update(cls=out.pooler_output)
    )
    params = list(model.parameters()) + list(aux_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    held_out = generate(500, HELD_OUT_SEED)
    start = time.time()
    model.train()
    for step in range(steps):
        samples = generate(batch_size, TRAIN_SEED * 10**7 + step)
        inputs = encode(processor, samples, device)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        loss = nn.functional.cross_entropy(logits, answer_ids(processor, samples, device))
        labels = torch.from_numpy(np.stack([presence_labels(s.objects) for s in samples])).to(device)
        aux = nn.functional.binary_cross_entropy_with_logits(aux_head(pooled["cls"]), labels)
        optimizer.zero_grad(set_to_none=True)
        (loss + aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.eval()
            acc = accuracy(model, processor, held_out[:200])
            model.train()
            print(f"step {step + 1:>6}  loss {loss.item():.3f}  aux {aux.item():.3f}  "
                  f"held-out acc {acc:.3f}  {time.time() - start:.0f}s", flush=True)  # fmt: skip
    hook.remove()
    model.eval()
    return model, processor, accuracy(model, processor, held_out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--aux-weight", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor, acc = train(args.steps, args.batch_size, args.lr, args.aux_weight, args.device)
    out = Path(args.out)
    model.to("cpu").save_pretrained(out)
    processor.save_pretrained(out)
    print(f"held-out accuracy (500 questions): {acc:.3f}; saved to {out}")


if __name__ == "__main__":
    main()
