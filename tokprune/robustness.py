"""How stable is a method's kept set under small input perturbations?

After "Less Is More — Until It Breaks: Security Pitfalls of Vision Token Compression in Large
Vision-Language Models": when a method's token ranking flips under imperceptible noise, an attacker can
steer which evidence reaches the LLM. `kept_set_stability` measures the mean Jaccard overlap between the
visual tokens kept for the clean images and for noisy copies of them (1.0 = the same tokens every time).
"""

from __future__ import annotations

import torch

import tokprune


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two index sets (1.0 for two empty sets)."""
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / len(a | b) if a | b else 1.0


@torch.no_grad()
def kept_set_stability(
    model,
    inputs: dict,
    method,
    *,
    noise_std: float = 0.01,
    trials: int = 5,
    seed: int = 0,
    budget: int | None = None,
    keep_ratio: float | None = None,
    **options,
) -> dict:
    """Mean (and min) Jaccard overlap of the final kept sets between `inputs` and `trials` noisy copies.

    The noise is Gaussian with std `noise_std` in the processor's normalised pixel space (about
    noise_std * 0.27 * 255 grey levels for CLIP normalisation), drawn from a generator seeded with `seed`.
    Returns {"mean_jaccard", "min_jaccard", "per_trial": [...], "visual_kept": [...]} over batch rows.
    """
    pixels = inputs["pixel_values"]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with tokprune.apply(model, method, budget=budget, keep_ratio=keep_ratio, **options) as pruner:
        model(**inputs)
        clean = pruner.stats.kept
        per_trial = []
        for _ in range(trials):
            noise = torch.randn(pixels.shape, generator=generator).to(
                device=pixels.device, dtype=pixels.dtype
            )
            model(**{**inputs, "pixel_values": pixels + noise_std * noise})
            per_trial.append(sum(jaccard(a, b) for a, b in zip(clean, pruner.stats.kept)) / len(clean))
        kept = pruner.stats.visual_kept
    return {
        "mean_jaccard": sum(per_trial) / len(per_trial),
        "min_jaccard": min(per_trial),
        "per_trial": per_trial,
        "visual_kept": kept,
    }
