"""VTC-CLS: [CLS] attention averaged over a range of ViT layers (a layer ensemble), top-k."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.core.budget import Budget
from tokprune.errors import MethodOptionError
from tokprune.methods.base import ImageTokens, Method, Selection, topk_sorted
from tokprune.methods.options import check_vision_layer


@dataclass
class VTCCLS(Method):
    """VTC-CLS — Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs",
    arXiv:2412.05819 (2024).

    Score of a token = the head-mean attention the ViT's [CLS] query pays to it, averaged over the vision
    layers start_layer .. end_layer (both inclusive); keep the top-k in their original order, before the
    projector. On ViTs without a [CLS] token (Qwen) the adapters' "cls_attention" is the attention each
    token receives.

    Sources. The paper's method section itself could not be read here (only its abstract and a TL;DR
    were reachable); the rule below is what the abstract says (the [CLS] attention is the importance
    indicator, optionally ensembled over several layers) plus a detailed third-party summary of the paper
    PDF, which reports: the per-layer score is the [CLS] row averaged over heads; the ensemble takes K
    layers counting back from the penultimate one and combines them by averaging (mean did better than
    max or min in the paper's ablation); K = 3 was the best setting (by the overlap ratio and Spearman
    correlation the paper measures); the top U tokens are kept (results at U = 64, 128, 256). Equation and
    section numbers are therefore not cited. The same summary says the scores can also drive pruning
    inside the LLM after its 2nd layer; that variant is not implemented here.

    Defaults follow the paper: K = 3 layers ending at the penultimate one, i.e. start_layer = -4,
    end_layer = -2 (-1 is the last layer; on LLaVA-1.5's 24-layer CLIP-L these are layers 20, 21, 22
    counted from 0). The authors' code (github.com/THU-MIG/VTC-CLS) sums attentions[start:-1], with the
    start layer given on every benchmark script's command line; its loader's fallback value 16 would
    give 7 layers (start_layer = -8); pass that to reproduce it. Budget: 64 tokens per image, the
    paper's strongest compression (88.9 % of LLaVA-1.5's 576 tokens removed).

    Layers are vision encoder-layer indices, so that the range works for any depth: negative = from the
    end, non-negative = from the start (0 the first layer). Give both of the same sign; `signals` lists
    one "cls_attention@i" per layer.

    Deliberate differences: (1) the range ends at the penultimate layer on every model; on Qwen2.5-VL the
    layer feeding the merger is the last block, so give end_layer = -1 to include it; (2) ties are broken
    towards the lower index (the code uses torch.topk, whose order among ties is unspecified); (3) the
    code sums the layers where the paper averages them; the two rank identically.
    Code: github.com/THU-MIG/VTC-CLS (commit e41ac9b4c0db235b3f68a84dbd6bd35f24156a7c),
    llava/model/multimodal_encoder/clip_encoder.py `cls_token_only` and llava/model/llava_arch.py
    `encode_images` (LLaVA-1.5 only: one 576-token image hard-coded). Agreement
    (tests/agreement/test_vtc_cls.py): the kept set equals the re-implementation of that selection
    (start_layer = depth + start_layer of tokprune's) on the tiny LLaVA-1.5.
    Layers must exist in the tower: `tokprune.apply` fails with a MethodOptionError naming the tower's
    depth when a layer of the range lies outside [-depth, depth - 1] (nothing wraps around; on a tower
    with fewer than 4 layers give a shorter range, e.g. start_layer = -2, end_layer = -1).
    """

    name = "vtc_cls"
    family = "[CLS] attention"
    where = "pre"
    default_budget = Budget(tokens=64)
    paper = "Wang et al., arXiv:2412.05819 (VTC-CLS)"
    code_families = ("llava",)

    start_layer: int = -4
    end_layer: int = -2

    def __post_init__(self) -> None:
        check_vision_layer(self, "start_layer")
        check_vision_layer(self, "end_layer")
        if (self.start_layer < 0) != (self.end_layer < 0):
            raise MethodOptionError(
                "vtc_cls: start_layer and end_layer must both count from the end (negative) or both from "
                f"the start (non-negative), got {self.start_layer} and {self.end_layer}"
            )
        if self.start_layer > self.end_layer:
            raise MethodOptionError(
                f"vtc_cls: start_layer ({self.start_layer}) must not come after end_layer ({self.end_layer})"
            )

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(range(self.start_layer, self.end_layer + 1))

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(f"cls_attention@{i}" for i in self.layers)

    def scores(self, image: ImageTokens) -> torch.Tensor:
        """(n,) float32: the [CLS] attention averaged over the layer range (the paper's ensemble)."""
        device = image.embeds.device
        per_layer = [image.signals[name].to(device).float().reshape(-1) for name in self.signals]
        return torch.stack(per_layer).mean(0)

    def select(self, image: ImageTokens, k: int) -> Selection:
        n = image.n
        if k >= n or k <= 0:
            return Selection(keep=torch.arange(max(0, min(k, n)), device=image.embeds.device))
        return Selection(keep=topk_sorted(self.scores(image), k))
