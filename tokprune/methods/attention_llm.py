"""In-LLM attention methods: FastV (one stage) and PyramidDrop (several stages)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokprune.core.budget import Budget
from tokprune.errors import BudgetError, MethodOptionError
from tokprune.methods.base import ImageTokens, LLMMethod, Selection, topk_sorted
from tokprune.methods.options import (
    check_choice,
    check_int,
    check_int_tuple,
    check_llm_layer,
    check_ratio_tuple,
)

# how FastV turns keep_ratio into a count: tokprune's ceil (DESIGN §3), or Python's round() (half to even)
# as the llava-hf port's `round(image_token_length * (1 - fastv_r))`
FASTV_ROUNDINGS = ("ceil", "round")
# how PyramidDrop turns ratios into counts: tokprune's ceil, or the code's int(N * ratio) (floor)
PDROP_ROUNDINGS = ("ceil", "floor")


@dataclass
class FastV(LLMMethod):
    """FastV — Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
    Acceleration for Large Vision-Language Models", ECCV 2024.

    What the official code does (pkunlp-icler/FastV at d1659729, `LlamaModel.forward` in
    src/transformers/.../llama/modeling_llama.py, the `use_fast_v and fast_v_inplace` branch; the llava-hf
    port's `LlamaModel.fastv_forward` selects the same way), and the default here: layers < `layer` (K)
    see every token; before layer K the visual tokens are ranked by layer K - 1's post-softmax attention
    row of the last prompt token, averaged over the heads, and the top k of each image are kept in their
    original order, at their original positions; layers >= K see only those. Defaults K = 2, R = 50%
    (keep_ratio 0.5; the code's `fast_v_attention_rank` is `budget`).

    rounding: how keep_ratio becomes a count: "ceil" (default, ceil(keep_ratio * n), DESIGN §3) or
    "round" (Python's round(), halves to even, as the llava-hf port's round(N * (1 - R))). The two agree on
    LLaVA-1.5's 576 tokens at every R of the paper; e.g. 729 tokens at 0.5 give 365 and 364.

    Remaining differences from the authors' code:
      * the score row is recomputed from layer K - 1's projections and its KV cache (the model keeps
        running sdpa/flash attention; the code needs eager attention with output_attentions, and its
        KV-cache port runs layer K - 1 twice); softmax and head mean in float32 (the code: softmax in
        float32, cast to the model's dtype, head mean in that dtype);
      * pruned once, in the prefill, and decode steps read the pruned cache (the inplace path has no cache:
        it re-runs and re-prunes the whole sequence at every generated token; the README's KV-cache
        variant prunes once, as here);
      * the query is each row's last real token (the code: the last position, a pad token in a
        right-padded batch); every image of a prompt is ranked on its own span with its own count (the
        code knows one span, `fast_v_sys_length` + `fast_v_image_token_length`);
      * ties go to the lower index (torch.topk's order is unspecified).
    """

    name = "fastv"
    family = "attention"
    signals = ("last_query_attention",)
    default_budget = Budget(ratio=0.5)
    paper = "Chen et al., ECCV 2024 (FastV)"
    code_families = ("llava",)
    layer: int = 2
    rounding: str = "ceil"

    def __post_init__(self) -> None:
        check_int(self, "layer", 1)
        check_choice(self, "rounding", FASTV_ROUNDINGS)

    def boundaries(self, num_layers: int) -> list[int]:
        check_llm_layer(self.layer, num_layers, "layer", self.name)
        return [self.layer]

    def stage_counts(self, n: int, budget: Budget) -> list[int]:
        if self.rounding == "round" and budget.ratio is not None:
            return [min(n, max(1, round(budget.ratio * n)))]
        return [budget.kept(n)]

    def select(self, image: ImageTokens, k: int) -> Selection:
        return Selection(keep=topk_sorted(image.signals["last_query_attention"], k))


@dataclass
class PyramidDrop(LLMMethod):
    """PyramidDrop — Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
    Visual Redundancy Reduction", CVPR 2025.

    What the official code does (Cooperx521/PyramidDrop at 6444f304, `LlamaModel.pdrop_forward` and
    `pdrop_rank_drop` in llava/model/modeling_llama_pdrop.py; eval scripts `layer_list [8,16,24]`,
    `image_token_ratio_list [0.5,0.25,0.125]`), and the default here: at each boundary layer b of `layers`
    (default (8, 16, 24) for a 32-layer LLM, i.e. L/4, L/2, 3L/4), before layer b runs, layer b's own
    input layernorm, q/k projections and RoPE give the softmax attention of the last token of the prompt
    (the last instruction token) over the sequence, averaged over the heads; the image tokens still
    present are ranked by it and the top ones kept, in their original order. Only the prefill prunes.

    Stage sizes: `ratios` (one per stage, each relative to the previous stage, λ in the paper) or, by
    default, geometric ratios chosen so that the final stage holds `budget`/`keep_ratio`. The default
    keep_ratio 0.125 gives λ = 0.5: 576 -> 288 -> 144 -> 72, the code's published setting. Giving
    `ratios` and a budget together is an error (the final count would be defined twice).

    rounding: "ceil" (default; every stage rounds up, the final one is ceil(keep_ratio * n), DESIGN §3) or
    "floor": the code's int(n * r_s) for every stage, r_s the stage's ratio of the image's original count
    (the code's `image_token_ratio_list`; with `ratios`, their running product), at least 1. Both give
    288/144/72 of 576 at λ = 0.5; e.g. 729 tokens give 365/183/92 and 364/182/91.

    Remaining differences from the authors' code:
      * positions: the code renumbers the kept sequence 0, 1, ... after every drop (and shifts the decode
        steps' position ids by the dropped count); by default tokprune keeps every token's original
        position (DESIGN §4), which changes the RoPE of every later layer, so from the second stage on kept
        sets differ (measured on a tiny random LLaVA: Jaccard 0.33-0.40 at the second stage; the first
        stage is identical). `tokprune.apply(..., positions="contiguous")` renumbers as the code does
        (`code_positions`) and then agrees at every stage;
      * softmax and head mean in float32 (the code: softmax in float32, cast to the model's dtype);
      * the query is each row's last real token (the code: `prompt_len + image_tokens - 1`, the same token
        in an unpadded prefill); every image of a prompt is ranked on its own (the code ranks the span of
        the first image of a row, `image_token_posi`, with the counts of `image_tokens`);
      * on a model with grouped-query attention each key serves its query group, as in the attention
        itself (the code, written for LLaVA-1.5, has no GQA); ties go to the lower index (torch.topk's
        order is unspecified).
    """

    name = "pdrop"
    family = "progressive"
    signals = ("last_query_attention",)
    default_budget = Budget(ratio=0.125)
    paper = "Xing et al., CVPR 2025 (PyramidDrop)"
    score_at = "boundary"
    code_families = ("llava",)
    code_positions = "contiguous"
    layers: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None
    rounding: str = "ceil"

    def __post_init__(self) -> None:
        check_int_tuple(self, "layers")
        check_ratio_tuple(self, "ratios")
        check_choice(self, "rounding", PDROP_ROUNDINGS)
        if self.ratios is not None and self.layers is not None and len(self.layers) != len(self.ratios):
            raise MethodOptionError(
                f"pdrop: layers={self.layers} has {len(self.layers)} stage layers but ratios={self.ratios} has "
                f"{len(self.ratios)} ratios; give one ratio per layer (each stage's fraction of the one "
                "before it), or leave ratios out and set budget / keep_ratio to derive them"
            )

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
        if self.rounding == "floor":
            counts = [max(1, math.floor(n * f + 1e-9)) for f in self._fractions(n, budget, n_stages)]
            if self.ratios is None and budget.ratio is None:
                counts[-1] = budget.kept(n)  # a token budget is exact
            return [min(c, n) for c in counts]
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

    def _fractions(self, n: int, budget: Budget, n_stages: int) -> list[float]:
        """Each stage's kept fraction of the image's n tokens (the code's `image_token_ratio_list`)."""
        if self.ratios is not None:
            return [math.prod(self.ratios[: s + 1]) for s in range(n_stages)]
        ratio = budget.ratio if budget.ratio is not None else min(1.0, budget.kept(n) / n)
        return [ratio ** ((s + 1) / n_stages) for s in range(n_stages)]

    def select(self, image: ImageTokens, k: int) -> Selection:
        return Selection(keep=topk_sorted(image.signals["last_query_attention"], k))


def reject_budget_conflict(method, given: bool) -> None:
    """A method whose options fix the final count cannot also take budget/keep_ratio."""
    if given and getattr(method, "fixes_budget", False):
        raise BudgetError(
            f"{method.name}: its stage options fix the kept count; do not also give budget/keep_ratio"
        )
