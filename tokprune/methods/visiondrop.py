"""VisionDrop: visual-only, progressive pruning before and inside the LLM (dominant tokens + contextual merging)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokprune.core.budget import Budget
from tokprune.errors import MethodOptionError
from tokprune.methods.base import CompositeMethod, ImageTokens, LLMMethod, Method, ScaledBudget, Selection
from tokprune.methods.options import check_bool, check_choice, check_int_tuple, check_number
from tokprune.methods.visionzip import MERGES, SPACES, VisionZip, dominant_contextual

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


KEY_SIGNALS = {"mean": "keys_mean", "concat": "keys"}  # key_heads -> the in-LLM key signal


@dataclass
class VisionDropVision(Method):
    """VisionDrop's stage before the LLM, VisionZip's step as the released code runs it (`VisionZip` with
    this stage's contextual share): dominant tokens by [CLS] attention at ViT layer -2, the [CLS] token
    among them (`cls_token`), contextual tokens merged by the cosine similarity of that layer's head-mean
    keys, a target becoming target + the mean of what it absorbed (`merge="add"`), on the features before
    the projector (`merge_space="vision"`); emitted as [CLS], dominant patches, contextual tokens."""

    name = "visiondrop"
    family = "visual-only, progressive"
    code_families = ("llava",)
    contextual_ratio: float | None = None
    merge: str = "add"
    merge_space: str = "vision"
    cls_token: bool = True

    def _zip(self, k: int) -> VisionZip:
        share = contextual_count(k, "pre", self.contextual_ratio) / k if k > 1 else 0.0
        return VisionZip(
            contextual_ratio=share, merge=self.merge, merge_space=self.merge_space, cls_token=self.cls_token
        )

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return self._zip(48).signals

    @property
    def features(self) -> str:  # type: ignore[override]
        return self.merge_space

    def select(self, image: ImageTokens, k: int) -> Selection:
        return self._zip(k).select(image, k)


@dataclass
class VisionDropLLM(LLMMethod):
    """VisionDrop's three in-LLM stages: before each boundary layer b runs, b's own layernorm and q/k
    projections give the attention every visual token receives from the visual tokens of its image
    ("visual_attention", no text query involved); the top tokens are dominant, contextual tokens are merged
    by the cosine similarity of b's post-RoPE keys averaged over the KV heads (`key_heads="mean"`, the code;
    "concat": the heads concatenated, tokprune's earlier reading), a target becoming target + the mean of
    what it absorbed (`merge="add"`, the code) or the mean of both ("mean"); emitted dominant tokens first,
    then the contextual ones (`Selection.order`)."""

    name = "visiondrop"
    family = "visual-only, progressive"
    score_at = "boundary"
    counts_on_image = True
    code_families = ("llava",)
    code_positions = "contiguous"
    layers: tuple[int, ...] | None = None
    contextual_ratio: float | None = None
    merge: str = "add"
    key_heads: str = "mean"

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return (SIGNAL, KEY_SIGNALS[self.key_heads])

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
        return dominant_contextual(
            image.embeds, image.signals[SIGNAL], image.signals[KEY_SIGNALS[self.key_heads]], k, n_context,
            merge=self.merge,
        )  # fmt: skip


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
    Misalignment", AAAI 2026 (arXiv:2506.22283). Default: the authors' released code,
    github.com/Ruixxxx/VisionDrop at commit f7a9444 (llava/visionzip/clip_encoder.py, main.py, utils.py;
    llava/model/modeling_llama_visiondrop.py: `visiondrop_forward`, `visiondrop_rank_drop`;
    llava/eval_visiondrop/model_vqa_loader.py; scripts/v1_5/visiondrop_eval/*.sh).

    What the paper says, as far as its text could be read here (the arXiv abstract, v1 and v2, and the
    opening of the HTML pages; the method section, its equations and its settings were not reachable, so no
    section or equation is cited): text-guided pruning suffers from causal, semantic and spatial
    misalignment between the modalities, so visual tokens are scored by intra-modal, visual-to-visual
    attention alone, never by text; the visual encoder and the LLM are treated as one system, pruned
    progressively; each stage keeps dominant tokens and adds a few contextual tokens by lightweight merging.
    None of the numbers below is in that text.

    What the code does, and tokprune by default:
      * before the LLM (`VisionDropVision`), VisionZip's step (`visionzip(model, dominant=42,
        contextual=6)`): dominant = [CLS] plus the 41 patches of highest [CLS] attention at CLIP layer -2
        (42 in all); of the other patches, 6 uniformly spaced ones (step max(1, n_rest // 6)) become
        targets, each remaining patch joins the target whose head-mean layer -2 key is most similar
        (cosine), and a target becomes its own CLIP feature plus the mean of what it absorbed; all on the
        features before the projector, then projected; the LLM receives [CLS], the dominant patches in
        raster order, then the contextual tokens. In tokprune the [CLS] token takes the image's first free
        slot (`Selection.extra`);
      * inside the LLM, after layers 7, 15 and 23 have run (`layer_list` [8, 16, 24]: boundaries 8, 16,
        24, `layers`; on other depths scaled to L/4, L/2, 3L/4 and made strictly increasing, tokprune's
        choice): layer b's own input norm and q/k projections (with RoPE) give, for every visual query, a
        causal softmax row over all earlier tokens; averaged over the heads, restricted to the visual keys
        of the image and averaged over its visual queries, it scores each visual token
        ("visual_attention"); the top ones are dominant, the rest merged as before into uniformly spaced
        targets (in the sequence's current order) by the cosine similarity of b's post-RoPE keys, a target
        becoming its hidden state plus the mean of the absorbed ones; (dominant, contextual) = (30, 5),
        (22, 4), (16, 3); emitted dominant tokens first, then the contextual ones;
      * the code renumbers the shortened sequence (contiguous positions) at the LLM input and after every
        in-LLM stage.

    Stage counts: `budget`/`keep_ratio` = the final count f of an image (after the third in-LLM stage);
    the earlier stages keep ceil(f * c_s / 19) with c = 48, 35, 26, 19, the released schedule (42 + 6
    before the LLM, then 30 + 5, 22 + 4, 16 + 3), which the default keep_ratio 19/576 reproduces exactly;
    scaling it to other budgets is tokprune's rule (only this schedule is published in the code). The
    README's "32 tokens" for it is the mean over the layers; a setting of "N tokens" meant the same way
    corresponds to f of about 19 N / 32 here. Contextual share: round(k / 8) before the LLM and
    round(k / 7) inside it (the released splits), or round(k * `contextual_ratio`) at every stage.

    Options (the code's reading first): merge: "add" (target + mean of the absorbed) or "mean" (the mean
    of the target and the absorbed, tokprune's earlier reading), at every stage; merge_space: "vision"
    (the pre-LLM merge on the features before the projector) or "llm" (on the LLM input embeddings);
    cls_token: keep the [CLS] token among the pre-LLM dominant tokens (True) or take every token from the
    patches (False; required with merge_space="llm"). merge="mean", merge_space="llm", cls_token=False is
    tokprune's earlier version.

    key_heads: "mean" (the in-LLM similarity on the post-RoPE keys averaged over the KV heads, the code) or
    "concat" (the heads concatenated, tokprune's earlier reading).

    Reproduction: `tokprune.apply(..., order="selection", positions="contiguous")` also lays every in-LLM
    stage out as the code does (dominant tokens, then contextual ones) and renumbers after every stage
    (`code_positions`), and then equals the code's whole prefill.

    Remaining differences from the code:
      (1) by default (original order and positions) the in-LLM stages keep the sequence's order and every
          token its original position; the code moves the contextual tokens behind the dominant ones and
          renumbers, which changes the next stage's causal scores and its uniformly spaced targets (the
          reproduction mode does as the code);
      (2) the counts are exact per image (f from the user's budget) rather than fixed numbers for
          576-token images;
      (3) towers without [CLS] (SigLIP, Qwen) use the attention each patch receives and no [CLS] token;
          AnyRes images run the pre-LLM step per tile, as VisionZip's code does (VisionDrop's in-LLM code
          has only the LLaVA-1.5 counts);
      (4) ties in an attention score go to the lower index (torch.topk's order on ties is unspecified).
    """

    name = "visiondrop"
    family = "visual-only, progressive"
    default_budget = Budget(ratio=PUBLISHED_COUNTS[-1] / PUBLISHED_TOKENS)
    paper = "Xu et al., AAAI 2026 (VisionDrop, arXiv:2506.22283)"
    code_families = ("llava",)
    layers: tuple[int, ...] | None = None
    contextual_ratio: float | None = None
    merge: str = "add"
    merge_space: str = "vision"
    cls_token: bool = True
    key_heads: str = "mean"

    def __post_init__(self) -> None:
        check_choice(self, "key_heads", tuple(KEY_SIGNALS))
        check_int_tuple(self, "layers", len(PUBLISHED_LAYERS))
        check_number(self, "contextual_ratio", 0, 1, high_open=True, optional=True)
        check_choice(self, "merge", MERGES)
        check_choice(self, "merge_space", SPACES)
        check_bool(self, "cls_token")
        if self.cls_token and self.merge_space == "llm":
            raise MethodOptionError(
                "visiondrop: the [CLS] token (cls_token=True) exists only before the projector; with "
                "merge_space='llm' pass cls_token=False as well"
            )

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        vision = VisionDropVision(self.contextual_ratio, cls_token=self.cls_token).signals
        return (*vision, SIGNAL, KEY_SIGNALS[self.key_heads])

    def parts(self) -> list[Method]:
        layers = tuple(self.layers) if self.layers is not None else None
        vision = VisionDropVision(self.contextual_ratio, self.merge, self.merge_space, self.cls_token)
        return [vision, VisionDropLLM(layers, self.contextual_ratio, self.merge, self.key_heads)]

    def part_budgets(self, budget: Budget) -> list[Budget]:
        return [stage_budgets(budget)[0], budget]
