"""How stable is a method's kept set under small input perturbations?

After "Less Is More — Until It Breaks: Security Pitfalls of Vision Token Compression in Large
Vision-Language Models": when a method's token ranking flips under imperceptible noise, an attacker can
steer which evidence reaches the LLM. `kept_set_stability` measures the mean Jaccard overlap between the
visual tokens kept for the clean images and for noisy copies of them (1.0 = the same tokens every time).

What it compares: the kept *positions* (`PruneStats.kept`, indices in each row's visual-token order) and
nothing else. A merging method that keeps the same positions while its merged contents change scores 1.0.
A method whose kept positions do not depend on the image at all (a seeded random subset, spatial pooling,
ToMe when every matching round is full) also scores 1.0, by construction; the function detects this case
(`input_independent`: unrelated random images keep the very same positions) so that such a 1.0 is not read
as robustness.
"""

from __future__ import annotations

import math
import numbers

import torch

import tokprune
from tokprune.errors import UnsupportedInputError

PIXEL_KEYS = ("pixel_values", "pixel_values_videos")  # what is perturbed: images and video frames
CONTROLS = 2  # unrelated random images that decide `input_independent`


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two index sets (1.0 for two empty sets)."""
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / len(a | b) if a | b else 1.0


def check_stability_arguments(noise_std: float, trials: int) -> None:
    """Early checks of `kept_set_stability`'s numbers (the CLI runs them before loading a model)."""
    if isinstance(trials, bool) or not isinstance(trials, numbers.Integral) or trials < 1:
        raise UnsupportedInputError(f"trials must be an int >= 1 (noisy copies to compare), got {trials!r}")
    if (
        isinstance(noise_std, bool)
        or not isinstance(noise_std, numbers.Real)
        or not (math.isfinite(noise_std) and noise_std >= 0)
    ):
        raise UnsupportedInputError(
            f"noise_std must be a finite number >= 0 (std of the Gaussian noise in normalised pixels), "
            f"got {noise_std!r}"
        )


def pixel_keys(inputs: dict) -> list[str]:
    """The pixel tensors of `inputs` that the diagnostic perturbs; a clear error when there are none."""
    keys = [key for key in PIXEL_KEYS if inputs.get(key) is not None]
    if not keys:
        raise UnsupportedInputError(
            "kept_set_stability perturbs pixels, but the inputs hold neither pixel_values nor "
            "pixel_values_videos (a text-only prompt, or precomputed image features): give the processor's "
            "output for a prompt with an image or a video"
        )
    return keys


def _perturbed(inputs: dict, keys: list[str], std: float, generator: torch.Generator, replace: bool) -> dict:
    """`inputs` with Gaussian noise of `std` added to (or, with `replace`, instead of) every pixel tensor."""
    out = dict(inputs)
    for key in keys:
        pixels = inputs[key]
        noise = torch.randn(pixels.shape, generator=generator).to(device=pixels.device, dtype=pixels.dtype)
        out[key] = std * noise if replace else pixels + std * noise
    return out


def _mean_jaccard(clean: list[torch.Tensor], kept: list[torch.Tensor]) -> tuple[float, list[float]]:
    rows = [jaccard(a, b) for a, b in zip(clean, kept)]
    return sum(rows) / len(rows), rows


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
    """Jaccard overlap of the final kept positions between `inputs` and `trials` noisy copies of them.

    inputs: the processor's output for a prompt with images (`pixel_values`) and / or videos
    (`pixel_values_videos`); every pixel tensor gets Gaussian noise with std `noise_std` in the processor's
    normalised pixel space (about noise_std * 0.27 * 255 grey levels for CLIP normalisation), drawn from a
    generator seeded with `seed`. method, budget, keep_ratio, options: as for `tokprune.apply`.

    Returns a dict:
      per_trial: per noisy copy, the Jaccard overlap of the kept positions averaged over the batch rows;
      mean_jaccard: the mean of per_trial; min_jaccard: the lowest entry of per_trial (a batch mean, not
          one row); min_row_jaccard: the lowest overlap of any single row in any trial;
      visual_kept: the visual tokens every row kept (last noisy copy);
      input_independent: True when `CONTROLS` unrelated images (pure noise in place of the pixels) keep
          exactly the clean positions in every row: the method's kept positions do not depend on the image
          (random, pool, ToMe at full rounds), so a 1.0 says nothing about robustness.
    Only kept positions are compared: merged contents are not (see the module docstring).
    """
    check_stability_arguments(noise_std, trials)
    keys = pixel_keys(inputs)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with tokprune.apply(model, method, budget=budget, keep_ratio=keep_ratio, **options) as pruner:
        model(**inputs)
        clean = pruner.stats.kept
        per_trial, rows = [], []
        for _ in range(trials):
            model(**_perturbed(inputs, keys, noise_std, generator, replace=False))
            mean, per_row = _mean_jaccard(clean, pruner.stats.kept)
            per_trial.append(mean)
            rows += per_row
        kept = pruner.stats.visual_kept
        independent = True
        for _ in range(CONTROLS):
            model(**_perturbed(inputs, keys, 1.0, generator, replace=True))
            independent = independent and all(torch.equal(a, b) for a, b in zip(clean, pruner.stats.kept))
    return {
        "mean_jaccard": sum(per_trial) / len(per_trial),
        "min_jaccard": min(per_trial),
        "min_row_jaccard": min(rows),
        "per_trial": per_trial,
        "visual_kept": kept,
        "input_independent": independent,
    }
