"""VisionDrop: visual-only, progressive pruning before and inside the LLM (dominant tokens + contextual merging)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokprune.core.budget import Budget
from tokprune.errors import MethodOptionError
from tokprune.methods.base import CompositeMethod, ImageTokens, LLMMethod, Method, ScaledBudget, Selection
from tokprune.methods.cls_attention import dominant_contextual
from tokprune.methods.options import check_int_tuple, check_number

SIGNAL = "visual_attention"
# The authors' released LLaVA-1.5 configuration (576 tokens per image, 32 LLM layers; github.com/Ruixxxx/
# VisionDrop, README and scripts/v1_5/visiondrop_eval): kept tokens as dominant + contextual before the LLM
# and from the stage boundaries 8, 16, 24 on; the README calls it "32 tokens", the mean over the 32 layers
# ((48 + 35 + 26 + 19) * 8 / 32).
PUBLISHED_TOKENS = 576
PUBLISHED_DEPTH = 32
PUBLISHED_LAYERS = (8, 16, 24)
PUBLISHED_STAGES = ((42, 6), (30, 5), (22, 4), (16, 3))
PUBLISHED_COUNTS = tuple(d + c for d, c in PUBLISHED_STAGES)  # 48, 35, 26, 19


def stage_budgets(budget: Budget) -> list[Budget]:
    """Budgets of the four stages (pre, then the three in-LLM boundaries) for the final `budget`.

    Stage s keeps ceil(f * c_s / 19) of an image (at most its n tokens), f = budget.kept(n) and
    c = 48, 35, 26, 19 the published counts, so a final 19 of 576 gives exactly 48 / 35 / 26 / 19.
    """
    final = PUBLISHED_COUNTS[-1]
    return [ScaledBudget(final=budget, factor=c / final) for c in PUBLISHED_COUNTS[:-1]] + [budget]


# contextual share of the kept tokens that reproduces every published split: round(48 / 8) = 6 before the
# LLM; round(35 / 7) = 5, round(26 / 7) = 4, round(19 / 7) = 3 inside it
PUBLISHED_SHARES = {"pre": 1 / 8, "llm": 1 / 7}


def contextual_count(k: int, where: str, ratio: float | None) -> int:
    """Contextual tokens among the k kept at a stage before ("pre") or inside ("llm") the LLM:
    round(k * ratio), the published share when ratio is None; at most k - 1 (0 when k <= 1)."""
    share = ratio if ratio is not None else PUBLISHED_SHARES[where]
    return min(round(k * share), k - 1) if k > 1 else 0


@dataclass
class VisionDropVision(Method):
    """VisionDrop's stage before the LLM: dominant tokens by [CLS] attention at the feature layer of the
    ViT, contextual tokens merged by the cosine similarity of that layer's head-mean keys
    (`dominant_contextual`; the released code runs VisionZip's step here)."""

    name = "visiondrop"
    family = "visual-only, progressive"
    signals = ("cls_attention", "vit_keys")
    contextual_ratio: float | None = None

    def select(self, image: ImageTokens, k: int) -> Selection:
        n_context = contextual_count(k, "pre", self.contextual_ratio)
        return dominant_contextual(
            image.embeds, image.signals["cls_attention"], image.signals["vit_keys"], k, n_context
        )


@dataclass
class VisionDropLLM(LLMMethod):
    """VisionDrop's three in-LLM stages: before each boundary layer b runs, b's own layernorm and q/k
    projections give the attention every visual token receives from the visual tokens of its image
    ("visual_attention", no text query involved); the top tokens are dominant, contextual tokens are merged
    by the cosine similarity of b's post-RoPE keys with the KV heads concatenated (the released code
    averages them over the heads; see `VisionDrop`, difference 5)."""

    name = "visiondrop"
    family = "visual-only, progressive"
    signals = (SIGNAL, "keys")
    score_at = "boundary"
    counts_on_image = True
    layers: tuple[int, ...] | None = None
    contextual_ratio: float | None = None

    def boundaries(self, num_layers: int) -> list[int]:
        layers = list(self.layers) if self.layers is not None else scaled_layers(num_layers)
        if layers[0] < 1 or layers[-1] > num_layers - 1 or any(b <= a for a, b in zip(layers, layers[1:])):
            raise MethodOptionError(
                f"visiondrop: layers {tuple(layers)} must be strictly increasing in [1, {num_layers - 1}] "
                f"for this {num_layers}-layer LLM"
            )
        return layers

    def stage_counts(self, n: int, budget: Budget) -> list[int]:
        return [b.kept(n) for b in stage_budgets(budget)[1:]]

    def select(self, image: ImageTokens, k: int) -> Selection:
        n_context = contextual_count(k, "llm", self.contextual_ratio)
        return dominant_contextual(image.embeds, image.signals[SIGNAL], image.signals["keys"], k, n_context)


def scaled_layers(num_layers: int) -> list[int]:
    """The published boundaries (8, 16, 24) of 32 scaled to `num_layers`, rounded, made strictly increasing."""
    layers: list[int] = []
    for layer in PUBLISHED_LAYERS:
        scaled = max(1, math.floor(layer * num_layers / PUBLISHED_DEPTH + 0.5))
        layers.append(max(scaled, layers[-1] + 1) if layers else scaled)
    return layers


@dataclass
class VisionDrop(CompositeMethod):
    """VisionDrop — Xu, Wang, Luo and Du, "Rethinking Visual Token Reduction in LVLMs under Cross-modal
    Misalignment", AAAI 2026 (arXiv:2506.22283).

    What the paper says, as far as its text could be read here (the arXiv abstract, v1 and v2, and the
    opening of the HTML pages; the method section, its equations and its settings were not reachable, so no
    section or equation is cited): text-guided pruning suffers from causal, semantic and spatial
    misalignment between the modalities, so visual tokens are scored by intra-modal, visual-to-visual
    attention alone, never by text; the visual encoder and the LLM are treated as one system, pruned
    progressively; each stage keeps dominant tokens and adds a few contextual tokens by lightweight merging.
    None of the numbers below is in that text.

    What the authors' released code does (github.com/Ruixxxx/VisionDrop: llava/visionzip/clip_encoder.py,
    llava/model/modeling_llama_visiondrop.py, llava/eval_visiondrop/model_vqa_loader.py, README and
    scripts), the source of every rule and number used here:
      * before the LLM, VisionZip's step: dominant = [CLS] plus the 41 patches of highest [CLS] attention
        at CLIP layer -2 (42 in all); of the other patches, 6 uniformly spaced ones become targets, each
        remaining patch joins the target whose head-mean layer -2 key is most similar (cosine), and a
        target becomes its own CLIP feature plus the mean of what it absorbed; dominant tokens, in order,
        come first, the 6 contextual tokens after them;
      * inside the LLM, after layers 7, 15 and 23 have run (its layer_list [8, 16, 24], 0-based boundaries
        8, 16, 24): layer b's own input norm and q/k projections (with RoPE) give, for every visual query,
        a causal softmax row over all earlier tokens; averaged over the heads, restricted to the visual
        keys and averaged over the visual queries, it scores each visual token; the top ones are dominant,
        the rest are merged as before with b's post-RoPE keys averaged over the KV heads as the metric;
        the kept counts are (dominant, contextual) = (30, 5), (22, 4), (16, 3);
      * the shortened sequence is renumbered (contiguous positions).

    tokprune's version: every stage keeps k tokens of an image as k - c dominant tokens (the top by a
    visual-to-visual attention score) plus c contextual tokens (`dominant_contextual`: targets uniformly
    spaced over the remaining tokens in order; every other remaining token is merged into its most similar
    target, whose state becomes the mean of itself and what it absorbed).
      * before the LLM: score = [CLS] attention at the ViT feature layer (on towers without [CLS] the
        adapter's attention received, still visual-only), similarity = that layer's head-mean keys,
        merged states = the LLM input embeddings;
      * inside the LLM, before boundary layers `layers` (default 8, 16, 24 of 32, as in the code; on other
        depths scaled to L/4, L/2, 3L/4 and made strictly increasing, tokprune's choice): score =
        "visual_attention", the attention each visual token receives from the visual tokens of its own
        image in layer b's causal rows (head mean, from b's own layernorm and q/k projections, streamed
        over query blocks), similarity = b's post-RoPE keys (KV heads concatenated), merged states = the
        residual stream entering layer b.

    Stage counts: `budget`/`keep_ratio` = the final count f of an image (after the third in-LLM stage);
    the earlier stages keep ceil(f * c_s / 19) with c = 48, 35, 26, 19, the released schedule (42 + 6
    before the LLM, then 30 + 5, 22 + 4, 16 + 3), which the default keep_ratio 19/576 reproduces exactly;
    scaling it to other budgets is tokprune's rule (only this schedule is published in the code). The
    README's "32 tokens" for it is the mean over the layers; a setting of "N tokens" meant the same way
    corresponds to f of about 19 N / 32 here. Contextual share: round(k / 8) before the LLM and
    round(k / 7) inside it (the released splits), or round(k * `contextual_ratio`) at every stage.

    Deliberate differences from the released code: (1) a contextual token is the mean of its target and
    the absorbed tokens, where the code adds the absorbed tokens' mean to the target's state; (2) merged
    tokens keep their target's original position instead of being appended after the dominant ones, so
    positions keep their spatial meaning; in later stages this also changes the order the uniformly spaced
    targets are picked in; (3) the pre-LLM merge averages LLM input embeddings rather than CLIP features
    before the projector, and HF LLaVA drops [CLS] before the LLM, so all k tokens are patches (the code
    counts [CLS] among its 42 dominant tokens); (4) the counts are exact per image (f from the user's
    budget) rather than fixed numbers for 576-token images; (5) in-LLM similarity uses the KV heads'
    post-RoPE keys concatenated, not averaged over the heads (the engine's "keys" signal carries no head
    split): a key-norm-weighted sum of the heads' cosines instead of the cosine of the head-mean keys;
    (6) kept tokens keep their original positions (the engine's rule) instead of being renumbered.
    """

    name = "visiondrop"
    family = "visual-only, progressive"
    signals = ("cls_attention", "vit_keys", SIGNAL, "keys")
    default_budget = Budget(ratio=PUBLISHED_COUNTS[-1] / PUBLISHED_TOKENS)
    paper = "Xu et al., AAAI 2026 (VisionDrop, arXiv:2506.22283)"
    layers: tuple[int, ...] | None = None
    contextual_ratio: float | None = None

    def __post_init__(self) -> None:
        check_int_tuple(self, "layers", len(PUBLISHED_LAYERS))
        check_number(self, "contextual_ratio", 0, 1, high_open=True, optional=True)

    def parts(self) -> list[Method]:
        layers = tuple(self.layers) if self.layers is not None else None
        return [VisionDropVision(self.contextual_ratio), VisionDropLLM(layers, self.contextual_ratio)]

    def part_budgets(self, budget: Budget) -> list[Budget]:
        return [stage_budgets(budget)[0], budget]
