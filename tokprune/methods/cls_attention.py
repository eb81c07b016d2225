"""[CLS]-attention methods: FasterVLM (VisionZip, which also merges: `methods.visionzip`).

On ViTs without a [CLS] token (Qwen, SigLIP) the adapter's "cls_attention" signal is the attention each
token *receives* at the same layer, pooled over the patches merged into one LLM token.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection, topk_sorted
from tokprune.methods.options import check_choice

UNITS = ("per_unit", "joint")


@dataclass
class FasterVLM(Method):
    """FasterVLM — Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning:
    Make VLM Inference Faster", arXiv:2412.01818 (2024). Default: the authors' released code,
    github.com/Theia-4869/FasterVLM at commit f5d5f120 (`clip_encoder.py: feature_select`,
    `llava_arch.py: encode_images`).

    Score = head-mean [CLS] attention row at the penultimate ViT layer (the layer whose output feeds the
    projector); keep the top-k tokens in their original order. On an image of several units (LLaVA-NeXT's
    base view and tiles) every unit keeps its own top tokens, the budget split by unit size (equal for whole
    tiles, the code's same count per crop; `units="per_unit"`); `units="joint"` ranks all the image's
    tokens together (tokprune's former default). Default: 75% reduction (keep_ratio 0.25), one of the
    paper's main settings.

    Remaining differences from the code: ties go to the lower index; on LLaVA-NeXT, HF unpads the tiles
    (the code's LLaVA-NeXT path does not), so unpadded tiles get a share by their remaining size.
    """

    name = "fastervlm"
    family = "[CLS] attention"
    signals = ("cls_attention",)
    default_budget = Budget(ratio=0.25)
    paper = "Zhang et al., arXiv:2412.01818 (FasterVLM)"
    code_families = ("llava", "llava_next")

    units: str = "per_unit"

    def __post_init__(self) -> None:
        check_choice(self, "units", UNITS)

    @property
    def spatial(self) -> bool:  # type: ignore[override]
        return self.units == "per_unit"

    def select(self, image: ImageTokens, k: int) -> Selection:
        return Selection(keep=topk_sorted(image.signals["cls_attention"], k))
