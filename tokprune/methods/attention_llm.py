"""In-LLM attention methods: FastV (one stage) and PyramidDrop (several stages)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokprune.core.budget import Budget
from tokprune.errors import BudgetError, MethodOptionError
from tokprune.methods.base import ImageTokens, LLMMethod, Selection, topk_sorted
from tokprune.methods.options import check_int, check_int_tuple, check_llm_layer, check_ratio_tuple


@dataclass
class FastV(LLMMethod):
    """FastV — Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
    Acceleration for Large Vision-Language Models", ECCV 2024.

    Layers < `layer` (K) see every token; the visual tokens are ranked by the head-mean attention the last
    prompt token pays them in layer K - 1; layers >= K see only the top ones. Defaults K = 2, R = 50%
    (keep_ratio 0.5). The score row is recomputed from layer K - 1's projections and the KV cache, so the
    model keeps running sdpa/flash attention, and no cache is duplicated (unlike the reference code).
    """

    name = "fastv"
    family = "attention"
    signals = ("last_query_attention",)
    default_budget = Budget(ratio=0.5)
    paper = "Chen et al., ECCV 2024 (FastV)"
    layer: int = 2

    def __post_init__(self) -> None:
        check_int(self, "layer", 1)

    def boundaries(self, num_layers: int) -> list[int]:
        check_llm_layer(self.layer, num_layers, "layer", self.name)
        return [self.layer]

    def select(self, image: ImageTokens, k: int) -> Selection:
        return Selection(keep=topk_sorted(image.signals["last_query_attention"], k))


@dataclass
class PyramidDrop(LLMMethod):
    """PyramidDrop — Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
    Visual Redundancy Reduction", CVPR 2025.

    At each boundary layer b of `layers` (default (8, 16, 24) for a 32-layer LLM, i.e. L/4, L/2, 3L/4),
    layer b's own input layernorm and q/k projections give the attention of the last instruction token
    over the remaining tokens (head mean), and the top tokens are kept before layer b runs.

    Stage sizes: `ratios` (one per stage, each relative to the previous stage, λ in the paper) or, by
    default, geometric ratios chosen so that the final stage holds `budget`/`keep_ratio`. The default
    keep_ratio 0.125 gives λ = 0.5: 576 -> 288 -> 144 -> 72, the paper's LLaVA-1.5 setting. Giving
    `ratios` and a budget together is an error (the final count would be defined twice).
    """

    name = "pdrop"
    family = "progressive"
    signals = ("last_query_attention",)
    default_budget = Budget(ratio=0.125)
    paper = "Xing et al., CVPR 2025 (PyramidDrop)"
    score_at = "boundary"
    layers: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_int_tuple(self, "layers")
        check_ratio_tuple(self, "ratios")
        if self.ratios is not None and self.layers is not None and len(self.layers) != len(self.ratios):
            raise MethodOptionError(f"pdrop: {len(self.layers)} layers but {len(self.ratios)} ratios")

    @property
    def fixes_budget(self) -> bool:
        return self.ratios is not None

    def boundaries(self, num_layers: int) -> list[int]:
        n_stages = len(self.ratios) if self.ratios is not None else 3
        layers = self.layers or tuple(num_layers * (s + 1) // (n_stages + 1) for s in range(n_stages))
        for layer in layers:
            check_llm_layer(layer, num_layers, "layers", self.name)
        if list(layers) != sorted(set(layers)):
            raise MethodOptionError(f"pdrop: layers must be strictly increasing, got {tuple(layers)}")
        return list(layers)

    def stage_counts(self, n: int, budget: Budget) -> list[int]:
        n_stages = len(self.ratios) if self.ratios is not None else len(self.layers) if self.layers else 3
        if self.ratios is not None:
            counts, current = [], n
            for ratio in self.ratios:
                current = math.ceil(ratio * current - 1e-9)
                counts.append(current)
            return counts
        final = budget.kept(n)
        if final >= n:
            return [n] * n_stages
        ratio = budget.ratio if budget.ratio is not None else final / n
        counts = [
            max(final, math.ceil(n * ratio ** ((s + 1) / n_stages) - 1e-9)) for s in range(n_stages - 1)
        ]
        return counts + [final]

    def select(self, image: ImageTokens, k: int) -> Selection:
        return Selection(keep=topk_sorted(image.signals["last_query_attention"], k))


def reject_budget_conflict(method, given: bool) -> None:
    """A method whose options fix the final count cannot also take budget/keep_ratio."""
    if given and getattr(method, "fixes_budget", False):
        raise BudgetError(
            f"{method.name}: its stage options fix the kept count; do not also give budget/keep_ratio"
        )
