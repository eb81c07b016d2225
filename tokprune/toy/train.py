"""Train the toy VLM on the procedural task (deterministic; CPU or GPU).

    python -m tokprune.toy.train --steps 6000 --out tokprune/toy/weights

Every training sequence holds one scene and all the question types it can answer, in a random order:
"USER: <image> q1 ASSISTANT: a1 q2 ASSISTANT: a2 ...". The first question has exactly the evaluation
format; the others reuse the same 196 visual tokens, which gives about 5x the supervision per image for
about 1.25x the compute.

Loss = cross-entropy of every one-word answer at its "ASSISTANT:" position
  + `aux_weight` x a [CLS] objective: from the ViT's pooled [CLS] output, predict which of the 12
    colour-shape pairs are in the scene (binary cross-entropy). It gives [CLS] a reason to attend to the
    objects, as CLIP's contrastive objective does for real models;
  + `patch_weight` x a patch objective: from each patch token of the layer the LLM reads
    (`vision_feature_layer`), predict the colour-shape pair covering it and whether it holds an object's
    centre (`task.patch_labels`). It makes the visual features local, as in a pretrained ViT, and cuts
    the CPU training time several-fold.
The auxiliary heads are dropped after training. Samples come from `task.generate` with a seed per step,
so a run is reproducible on CPU for a given thread count.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tokprune.patches.llava import clip_encoder_layers, feature_layer_index
from tokprune.toy.model import N_VISUAL, PATCH, WEIGHTS, pixel_values, toy_config, toy_processor
from tokprune.toy.task import PAIRS, generate, generate_scenes, patch_labels, presence_labels

TRAIN_SEED = 1
HELD_OUT_SEED = 10**6
VALIDATION_SEED = 2 * 10**6


def encode(processor, samples, device) -> dict:
    """Model inputs for samples without going through PIL (identical to the processor's output)."""
    tok = processor.tokenizer
    texts = [f"USER: {'<image>' * N_VISUAL} {s.question} ASSISTANT:" for s in samples]
    batch = tok(texts, return_tensors="pt", padding=True)
    batch["pixel_values"] = pixel_values(np.stack([s.image for s in samples]))
    return {k: v.to(device) for k, v in batch.items()}


def encode_dialogues(processor, scenes, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Training inputs with several questions per scene (right-padded), the (row, position) of every
    "ASSISTANT:" token, and the id of the answer that follows it: (inputs, where (Q, 2), answers (Q,))."""
    tok = processor.tokenizer
    texts = []
    for first, rest in scenes:
        turns = [(first.question, first.answer), *rest]
        qa = " ".join(f"{q} ASSISTANT: {a}" for q, a in turns)
        texts.append(f"USER: {'<image>' * N_VISUAL} {qa}")
    batch = tok(texts, return_tensors="pt", padding=True)
    batch["pixel_values"] = pixel_values(np.stack([first.image for first, _ in scenes]))
    ids = batch["input_ids"]
    where = (ids == tok.convert_tokens_to_ids("ASSISTANT:")).nonzero()
    answers = ids[where[:, 0], where[:, 1] + 1]
    return {k: v.to(device) for k, v in batch.items()}, where.to(device), answers.to(device)


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


class AuxiliaryHeads(nn.Module):
    """The training-only heads: [CLS] presence (12), patch pair (13-way) and patch centre (1)."""

    def __init__(self, width: int):
        super().__init__()
        self.presence = nn.Linear(width, len(PAIRS))
        self.pair = nn.Linear(width, len(PAIRS) + 1)
        self.centre = nn.Linear(width, 1)

    def losses(
        self, cls: torch.Tensor, patches: torch.Tensor, samples, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cls (B, D) pooled [CLS]; patches (B, P, D) patch tokens -> (presence loss, patch loss)."""
        presence = torch.from_numpy(np.stack([presence_labels(s.objects) for s in samples])).to(device)
        cls_loss = nn.functional.binary_cross_entropy_with_logits(self.presence(cls), presence)
        pair, centre = (
            torch.from_numpy(np.stack(t)).to(device) for t in zip(*(patch_labels(s, PATCH) for s in samples))
        )
        patch_loss = nn.functional.cross_entropy(self.pair(patches).flatten(0, 1), pair.flatten())
        centre_logits = self.centre(patches).squeeze(-1)
        patch_loss = patch_loss + nn.functional.binary_cross_entropy_with_logits(
            centre_logits, centre.float()
        )
        return cls_loss, patch_loss


def _vision_taps(model) -> tuple[dict, list]:
    """Forward hooks keeping the pooled [CLS] and the patch tokens of the layer the LLM reads."""
    taps: dict = {}
    tower = model.model.vision_tower
    layers = clip_encoder_layers(tower)
    layer = layers[feature_layer_index(model.config.vision_feature_layer, len(layers))]

    def keep_patches(module, args, out):
        taps["patches"] = (out[0] if isinstance(out, tuple) else out)[:, 1:]

    hooks = [
        tower.register_forward_hook(lambda m, a, out: taps.update(cls=out.pooler_output)),
        layer.register_forward_hook(keep_patches),
    ]
    return taps, hooks


def train(
    steps: int, batch_size: int, lr: float, aux_weight: float, patch_weight: float, device: str,
    log_every: int = 100, checkpoint: Path | None = None,
):  # fmt: skip
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    processor = toy_processor()
    model = LlavaForConditionalGeneration(toy_config(processor)).to(device)
    model.config._attn_implementation = "sdpa"
    heads = AuxiliaryHeads(model.config.vision_config.hidden_size).to(device)
    taps, hooks = _vision_taps(model)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    validation = generate(300, VALIDATION_SEED)
    start = time.time()
    model.train()
    for step in range(steps):
        scenes = generate_scenes(batch_size, TRAIN_SEED * 10**7 + step)
        inputs, where, answers = encode_dialogues(processor, scenes, device)
        logits = model(**inputs).logits[where[:, 0], where[:, 1]]
        loss = nn.functional.cross_entropy(logits, answers)
        samples = [first for first, _ in scenes]
        cls_loss, patch_loss = heads.losses(taps["cls"], taps["patches"], samples, device)
        optimizer.zero_grad(set_to_none=True)
        (loss + aux_weight * cls_loss + patch_weight * patch_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.eval()
            acc = accuracy(model, processor, validation)
            model.train()
            print(f"step {step + 1:>6}  loss {loss.item():.3f}  cls {cls_loss.item():.3f}  "
                  f"patch {patch_loss.item():.3f}  val acc {acc:.3f}  {time.time() - start:.0f}s", flush=True)  # fmt: skip
            if checkpoint is not None:
                save(model, processor, checkpoint)
    for hook in hooks:
        hook.remove()
    model.eval()
    return model, processor, accuracy(model, processor, generate(500, HELD_OUT_SEED))


def save(model, processor, out: Path) -> None:
    model.to("cpu").save_pretrained(out)
    processor.save_pretrained(out)
    model.to(next(iter(model.parameters())).device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--aux-weight", type=float, default=0.5)
    parser.add_argument("--patch-weight", type=float, default=0.5)
    parser.add_argument("--checkpoint", default=None, help="save here at every log line")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    model, processor, acc = train(
        args.steps, args.batch_size, args.lr, args.aux_weight, args.patch_weight, args.device,
        checkpoint=checkpoint,
    )  # fmt: skip
    out = Path(args.out)
    save(model, processor, out)
    print(f"held-out accuracy (500 questions): {acc:.3f}; saved to {out}")


if __name__ == "__main__":
    main()
