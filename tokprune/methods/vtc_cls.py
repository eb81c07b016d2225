"""VTC-CLS: [CLS] attention summed over a range of ViT layers (a layer ensemble), top-k."""

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

    Score of a token = the head-mean [CLS] attention it gets, summed over the vision layers
    start_layer .. end_layer (both inclusive); keep the top-k in their original order. On ViTs without a
    [CLS] token (Qwen) the adapters' "cls_attention" is the attention each token receives.

    Layers are vision encoder-layer indices, so that the range works for any depth: negative = from the
    end (-1 the last layer, -2 the penultimate, i.e. LLaVA-1.5's feature layer), non-negative = from the
    start (0 the first layer). Give both of the same sign; `signals` lists one "cls_attention@i" per layer.

    Defaults, from the authors' public code (github.com/THU-MIG/VTC-CLS, LLaVA-1.5 with CLIP-L/336,
    24 layers): the sum runs over attentions[16:-1], i.e. layers 16 .. 22 counted from 0 = the 8th-last
    to the penultimate (start_layer = -8, end_layer = -2): 16 is the default `--layer` of their
    evaluation loader, and every benchmark script takes the start layer as an argument. The scripts
    take the kept token count as an argument too; the default here is 64 per image (the usual 88.9%
    reduction comparison point), not a number the authors single out.

    Deliberate differences: (1) the range ends at the penultimate layer on every model; on Qwen2.5-VL the
    layer feeding the merger is the last block, so give end_layer = -1 to include it; (2) ties are broken
    towards the lower index (the code uses torch.topk, whose order among ties is unspecified). The sum is
    what the code computes; a mean over the layers would rank identically.
    Note: the adapters take a layer index modulo the depth, so a range longer than a (tiny) tower wraps.
    """

    name = "vtc_cls"
    where = "pre"
    default_budget = Budget(tokens=64)
    paper = "Wang et al., arXiv:2412.05819 (VTC-CLS)"

    start_layer: int = -8
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
        """(n,) float32: the [CLS] attention summed over the layer range."""
        device = image.embeds.device
        return torch.stack([image.signals[name].to(device).float().reshape(-1) for name in self.signals]).sum(
            0
        )

    def select(self, image: ImageTokens, k: int) -> Selection:
        n = image.n
        if k >= n or k <= 0:
            return Selection(keep=torch.arange(max(0, min(k, n)), device=image.embeds.device))
        return Selection(keep=topk_sorted(self.scores(image), k))
