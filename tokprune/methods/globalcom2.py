"""GlobalCom²: the thumbnail (AnyRes base view) commands the compression of the high-resolution crops."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget, split_budget
from tokprune.methods.anyres import Mosaic, anyres_mosaic
from tokprune.methods.base import (
    ImageTokens,
    Method,
    Selection,
    topk_sorted,
    trivial_selection,
    vision_signal,
)
from tokprune.methods.holov import allocate_quotas
from tokprune.methods.options import check_number, check_vision_layer


def crop_weights(mosaic: Mosaic, thumbnail: torch.Tensor, temperature: float) -> list[float]:
    """Weight of every crop in the crops' share of the budget: size_i * (1 + sigma_i - 1 / N).

    thumbnail: (n_base,) [CLS] attention of the thumbnail's tokens, row-major. s_i = the thumbnail
    attention inside crop i's area of the image (`Mosaic.base_regions`), sigma = softmax(s / temperature)
    over the N crops; a crop's retention ratio is proportional to 1 + sigma_i - 1/N (the authors'
    r_i = R (1 + sigma_i - 1/N), which averages R over equal crops).
    """
    region = mosaic.base_regions().to(thumbnail.device)
    n_crops = len(mosaic.tiles)
    scores = torch.zeros(n_crops, dtype=torch.float32, device=thumbnail.device)
    scores.index_add_(0, region, thumbnail.float())
    sigma = torch.softmax(scores / temperature, dim=0).tolist()
    return [t.index.numel() * (1.0 + s - 1.0 / n_crops) for t, s in zip(mosaic.tiles, sigma)]


def global_crop_scores(mosaic: Mosaic, thumbnail: torch.Tensor) -> list[torch.Tensor]:
    """Per crop, (h_i * w_i,) the thumbnail attention seen from the crop: the thumbnail's (S_h, S_w)
    attention map resized bilinearly (half-pixel centres) to the (H, W) crop mosaic, cut to the crop."""
    s_h, s_w = mosaic.base.grid
    grid = thumbnail.float().reshape(1, 1, s_h, s_w)
    big = F.interpolate(grid, size=mosaic.size, mode="bilinear", align_corners=False)[0, 0]
    crops = []
    for tile, (r0, c0) in zip(mosaic.tiles, mosaic.origins):
        h, w = tile.grid
        crops.append(big[r0 : r0 + h, c0 : c0 + w].reshape(-1))
    return crops


@dataclass
class GlobalCom2(Method):
    """GlobalCom² — Liu et al., "Compression with Global Guidance: Towards Training-free High-Resolution
    MLLMs Acceleration" (arXiv:2501.05179; AAAI 2026 as "Global Compression Commander"). AnyRes only.

    An AnyRes image is a thumbnail (the base view: the whole image at tile resolution) plus crops (the
    high-resolution tiles). All scores are the head-mean [CLS] attention at one ViT layer (`layer`,
    default the layer feeding the projector), each view's from its own ViT pass. For k kept tokens of
    the image (thumbnail + crops, row-end separators excluded), i.e. retention ratio R = k / n:
      1. thumbnail: keeps its share of k in proportion to its size (R of its tokens, `split_budget`),
         its top tokens by its own attention;
      2. crop retention ratios (global guidance): crop i's score s_i is the thumbnail attention inside
         the crop's area of the image; sigma = softmax(s / temperature); r_i ∝ 1 + sigma_i - 1/N, so the
         crops share the rest of k in proportion to size_i * (1 + sigma_i - 1/N), capped at each crop's
         size (overflow re-shared), largest-remainder rounding: exactly k tokens (`allocate_quotas`);
      3. tokens in a crop: ranked by the global attention (the thumbnail's attention map resized
         bilinearly onto the crop mosaic and cut to the crop) plus local_weight times the crop's own
         attention, each L2-normalised over the crop (local_weight = 0: global attention alone).
    Kept tokens stay in their original order. An image without a base view and tiles (a video clip, an
    image of a several-image LLaVA-OneVision prompt) raises a ValueError.

    Budget mapping: the published retention ratio 0.25 = default keep_ratio 0.25 of the image's content
    tokens (the authors' code keeps every row-end newline token besides; here a pruned image loses its
    separators, the engine's rule).

    Deliberate differences from the authors' code (github.com/xuyang-liu16/GlobalCom2): (1) the code
    scores with the head mean of the pre-softmax [CLS] logits of the last ViT layer and uses
    temperature 10 on their crop sums; tokprune's signal is the post-softmax attention, whose crop sums
    add up to about 1, so temperature 10 would give every crop ratio R: the default temperature 0.1
    keeps the allocation adaptive (a crop holding 0.4 of the attention among 4 crops with 0.2 each gets
    sigma ≈ 0.71); `layer=-1` selects the last layer; (2) a crop's thumbnail area comes from the
    unpadded crop mosaic (the code splits the thumbnail into equal blocks for the ratios, but resizes
    onto the unpadded mosaic for the token scores, as here); (3) exactly k tokens (the code clips
    ratios at 1 and truncates, keeping fewer); (4) ties go to the lower index. The paper's text was not
    at hand when this was written: the ratio formula and the token score follow the authors' code and
    the abstract (the thumbnail directs the crops' retention ratios and their compression).
    Needs tiles: `tokprune.apply` refuses models without them (`needs_tiles`).
    """

    name = "globalcom2"
    where = "pre"
    default_budget = Budget(ratio=0.25)
    paper = "Liu et al., arXiv:2501.05179 (GlobalCom²)"
    needs_tiles = True

    temperature: float = 0.1
    local_weight: float = 1.0
    layer: int | None = None

    def __post_init__(self) -> None:
        check_number(self, "temperature", 0, low_open=True)
        check_number(self, "local_weight", 0)
        check_vision_layer(self, "layer", optional=True)

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return (vision_signal("cls_attention", self.layer),)

    def select(self, image: ImageTokens, k: int) -> Selection:
        if (trivial := trivial_selection(image, k)) is not None:
            return trivial
        device = image.embeds.device
        attention = image.signals[self.signals[0]].to(device).float().reshape(-1)
        mosaic = anyres_mosaic(image, self.name)
        base = mosaic.base.index.to(device)
        crops = [t.index.to(device) for t in mosaic.tiles]
        sizes = [c.numel() for c in crops]
        k_base, k_crops = split_budget(k, [base.numel(), sum(sizes)])
        thumbnail = attention[base]
        quotas = allocate_quotas(crop_weights(mosaic, thumbnail, self.temperature), sizes, k_crops)
        kept = [base[topk_sorted(thumbnail, k_base)]]
        for idx, glob, q in zip(crops, global_crop_scores(mosaic, thumbnail), quotas):
            score = F.normalize(glob, dim=0) + self.local_weight * F.normalize(attention[idx], dim=0)
            kept.append(idx[topk_sorted(score, q)])
        return Selection(keep=torch.cat(kept).sort().values)
