"""Train the toy VLM on the procedural task (deterministic; CPU or GPU).

    python -m tokprune.toy.train --out tokprune/toy/weights    # defaults: 800 vision + 2000 language steps

Two phases, as real VLMs are built from a pretrained vision encoder:

1. vision (`--vision-steps`, lr `--vision-lr`): the CLIP-style ViT alone, no LLM. Losses:
   `aux_weight` x a [CLS] objective: from the ViT's pooled [CLS] output, predict which of the 12
   colour-shape pairs are in the scene (binary cross-entropy), which gives [CLS] a reason to attend to
   the objects, as CLIP's contrastive objective does for real models; plus patch objectives on every
   patch token of the layer the LLM reads (`vision_feature_layer`): the colour-shape pair covering it,
   whether it holds an object's centre, and its (x, y) place (`task.patch_labels`), which make the
   features local and position-aware, as in a pretrained ViT;
2. language (`--steps`, lr `--lr`): the ViT frozen, the projector and the LLM learn to answer. Every
   training sequence holds one scene and up to `--per-type` distinct questions of every type, in a
   random order: "USER: <image> q1 ASSISTANT: a1 q2 ASSISTANT: a2 ...". The first question has exactly
   the evaluation format; the others reuse the same 196 visual tokens (several answers per image for
   little more compute). Loss: cross-entropy of every one-word answer at its "ASSISTANT:" position.

The auxiliary heads are dropped after training. Phase 1 draws its images from `task.scenes_only`, phase 2
its dialogues from `task.generate_scenes`, each with a seed per step (phase 1's images do not depend on the
question set), so a run is reproducible on CPU for a given thread count.
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
from tokprune.toy.task import PAIRS, generate, generate_scenes, patch_labels, presence_labels, scenes_only

TRAIN_SEED = 1
HELD_OUT_SEED = 10**6
VALIDATION_SEED = 2 * 10**6
VISION_SEED = 3


def encode(processor, samples, device) -> dict:
    """Model inputs for samples without going through PIL (identical to the processor's output)."""
    tok = processor.tokenizer
    texts = [f"USER: {'<image>' * N_VISUAL} {s.question} ASSISTANT:" for s in samples]
    batch = tok(texts, return_tensors="pt", padding=True)
    batch["pixel_values"] = pixel_values(np.stack([s.image for s in samples]))
    return {k: v.to(device) for k, v in batch.items()}


def encode_dialogues(processor, scenes, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Training inputs with several questions per scene (left-padded, as the tokenizer pads), the (row,
    position) of every "ASSISTANT:" token, and the id of the answer that follows it:
    (inputs, where (Q, 2), answers (Q,))."""
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
    """The vision-phase heads: [CLS] presence (12), patch pair (13-way), patch centre (1), patch xy (2)."""

    def __init__(self, width: int):
        super().__init__()
        self.presence = nn.Linear(width, len(PAIRS))
        self.pair = nn.Linear(width, len(PAIRS) + 1)
        self.centre = nn.Linear(width, 1)
        self.where = nn.Linear(width, 2)

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
        where = self.where(patches)  # (B, P, 2) the patch's (x, y) in [-1, 1]
        patch_loss = patch_loss + nn.functional.mse_loss(
            where, _patch_xy(patches.shape[1], device).expand_as(where)
        )
        return cls_loss, patch_loss


def _patch_xy(num_patches: int, device) -> torch.Tensor:
    """(1, P, 2) centre (x, y) of every patch in raster order, scaled to [-1, 1]."""
    g = math.isqrt(num_patches)
    coords = (torch.arange(g, dtype=torch.float32, device=device) + 0.5) / g * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=-1)[None]


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


def _optimizer(params: list, lr: float, steps: int):
    """AdamW with a linear warm-up (5% of the steps) and a cosine decay to zero."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    return optimizer, schedule


def train_vision(model, steps: int, batch_size: int, lr: float, aux_weight: float, device, log_every=100):
    """Phase 1: the vision tower alone, on the [CLS] presence and the patch objectives (no LLM)."""
    tower = model.model.vision_tower
    heads = AuxiliaryHeads(model.config.vision_config.hidden_size).to(device)
    taps, hooks = _vision_taps(model)
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer, schedule = _optimizer(params, lr, steps)
    start = time.time()
    tower.train()
    for step in range(steps):
        samples = scenes_only(batch_size, VISION_SEED * 10**7 + step)
        tower(pixel_values(np.stack([s.image for s in samples])).to(device))
        cls_loss, patch_loss = heads.losses(taps["cls"], taps["patches"], samples, device)
        optimizer.zero_grad(set_to_none=True)
        (aux_weight * cls_loss + patch_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"vision step {step + 1:>6}  cls {cls_loss.item():.3f}  patch {patch_loss.item():.3f}  "
                  f"{time.time() - start:.0f}s", flush=True)  # fmt: skip
    for hook in hooks:
        hook.remove()
    tower.eval()


def train_language(
    model, processor, steps: int, batch_size: int, lr: float, per_type: int, device,
    log_every: int = 100, checkpoint: Path | None = None, validation_questions: int = 300,
):  # fmt: skip
    """Phase 2: projector and LLM on multi-question dialogues, the vision tower frozen; accuracy on
    `validation_questions` questions at every log line."""
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    tower.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = _optimizer(params, lr, steps)
    validation = generate(validation_questions, VALIDATION_SEED)
    start = time.time()
    model.model.multi_modal_projector.train()
    model.model.language_model.train()
    for step in range(steps):
        scenes = generate_scenes(batch_size, TRAIN_SEED * 10**7 + step, per_type)
        inputs, where, answers = encode_dialogues(processor, scenes, device)
        logits = model(**inputs).logits[where[:, 0], where[:, 1]]
        loss = nn.functional.cross_entropy(logits, answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.eval()
            acc = accuracy(model, processor, validation)
            model.model.multi_modal_projector.train()
            model.model.language_model.train()
            print(f"language step {step + 1:>6}  loss {loss.item():.3f}  val acc {acc:.3f}  "
                  f"{time.time() - start:.0f}s", flush=True)  # fmt: skip
            if checkpoint is not None:
                save(model, processor, checkpoint)
    tower.requires_grad_(True)
    model.eval()


def train(
    vision_steps: int, steps: int, batch_size: int, vision_lr: float, lr: float, aux_weight: float,
    per_type: int, device: str, checkpoint: Path | None = None,
    vision_from: Path | None = None, validation_questions: int = 300, held_out_questions: int = 500,
):  # fmt: skip
    """Both phases from a seeded initialisation -> (model, processor, held-out accuracy on
    `held_out_questions` questions).

    vision_from: a saved toy model whose vision tower is phase 1's result for the same settings; it is
    loaded instead of running phase 1 again (phase 2 uses no torch randomness, so the outcome is the same).
    """
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    processor = toy_processor()
    model = LlavaForConditionalGeneration(toy_config(processor)).to(device)
    model.config._attn_implementation = "sdpa"
    if vision_from is None:
        train_vision(model, vision_steps, batch_size, vision_lr, aux_weight, device)
    else:
        saved = LlavaForConditionalGeneration.from_pretrained(vision_from)
        model.model.vision_tower.load_state_dict(saved.model.vision_tower.state_dict())
        model.model.vision_tower.eval()
    train_language(
        model, processor, steps, batch_size, lr, per_type, device, checkpoint=checkpoint,
        validation_questions=validation_questions,
    )  # fmt: skip
    return model, processor, accuracy(model, processor, generate(held_out_questions, HELD_OUT_SEED))


def save(model, processor, out: Path) -> None:
    """Write the model (moved to the CPU for saving) and its processor files to `out`; the model goes
    back to the device it was on (training continues there after a checkpoint)."""
    device = next(model.parameters()).device
    model.to("cpu").save_pretrained(out)
    processor.save_pretrained(out)
    model.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vision-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=2000, help="language-phase steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vision-lr", type=float, default=5e-3)
    parser.add_argument("--lr", type=float, default=2e-3, help="language-phase learning rate")
    parser.add_argument("--aux-weight", type=float, default=0.5)
    parser.add_argument("--per-type", type=int, default=2, help="questions of each type per training scene")
    parser.add_argument(
        "--vision-from", default=None, help="a saved toy model holding phase 1's vision tower"
    )
    parser.add_argument("--checkpoint", default=None, help="save here at every log line")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    model, processor, acc = train(
        args.vision_steps, args.steps, args.batch_size, args.vision_lr, args.lr, args.aux_weight, args.per_type,
        args.device, checkpoint=checkpoint,
        vision_from=Path(args.vision_from) if args.vision_from else None,
    )  # fmt: skip
    out = Path(args.out)
    save(model, processor, out)
    print(f"held-out accuracy (500 questions): {acc:.3f}; saved to {out}")


if __name__ == "__main__":
    main()
