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
    over the N crops (the paper's max-shifted softmax; its epsilon in the denominator is left out). The
    paper gives crop i the retention ratio r_i = R (1 + sigma_i - 1 / N); weighting by size keeps the
    ratios of the crops in exactly those proportions, and on crops of equal size the shares are
    exactly r_i * size_i (the weights sum to N * size, so the common factor is R).
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
    """GlobalCom² — Liu et al., "Global Compression Commander: Plug-and-Play Inference Acceleration for
    High-Resolution Large Vision-Language Models", AAAI 2026 (arXiv:2501.05179; v1-v2 titled
    "Compression with Global Guidance: Towards Training-free High-Resolution MLLMs Acceleration").
    AnyRes only.

    An AnyRes image is a thumbnail (the base view: the whole image at tile resolution) plus crops (the
    high-resolution tiles). All scores are the head-mean [CLS] attention (softmax row) at one ViT layer
    (`layer`, default the layer feeding the projector), each view's from its own ViT pass. For k kept
    tokens of the image (thumbnail + crops, row-end separators excluded), i.e. retention ratio R = k / n:
      1. thumbnail: keeps R of its tokens (its share of k in proportion to its size, `split_budget`),
         its top tokens by its own [CLS] attention;
      2. crop retention ratios (the paper's global-guided allocation): crop j's global score s_j is the
         sum of the thumbnail's [CLS] attention over the thumbnail tokens lying in the crop's area of
         the image; sigma = softmax(s / temperature) over the N crops; the paper sets
         r_j = R (1 + sigma_j - 1/N), which averages R when the crops are equal. Here the crops share
         the rest of k in proportion to size_j * (1 + sigma_j - 1/N) (`crop_weights`), capped at each
         crop's size with the overflow re-shared, largest-remainder rounding: exactly k tokens
         (`allocate_quotas`);
      3. tokens in a crop (the paper's holistic score): score = alpha * g + (1 - alpha) * l, where g is
         the global score (the thumbnail's attention map resized bilinearly onto the crop mosaic and cut
         to the crop) and l the crop's own [CLS] attention, each L2-normalised over the crop; the paper
         uses alpha = 0.5 (alpha = 1: global score alone, alpha = 0: the crop's own attention alone).
    Kept tokens stay in their original order. An image without a base view and tiles (a video clip, an
    image of a several-image LLaVA-OneVision prompt) raises an UnsupportedInputError (a ValueError) that
    says what to use instead.

    Budget mapping: the published retention ratio 0.25 = default keep_ratio 0.25 of the image's content
    tokens (the authors' code keeps every row-end newline token besides; here a pruned image loses its
    separators, the engine's rule).

    Sources. The crop score, the max-shifted softmax with temperature tau, r_j and the holistic score
    with alpha = 0.5 follow the equations of the paper's method section (checked against a rendering of
    those equations; the surrounding text, including the value of tau, the ViT layer and how g and l
    are normalised, could not be read), so the following details come from the authors' code
    (github.com/xuyang-liu16/GlobalCom2, llava/model/llava_arch.py): the L2 normalisation of g and l
    before they are added (the code adds them with equal weights, i.e. alpha = 0.5), the bilinear
    resize of the thumbnail map onto the unpadded crop mosaic, and the layer and temperature below.

    Deliberate differences from the authors' code: (1) temperature. The code applies its temperature 10 to
    crop sums of the head mean of the pre-softmax [CLS] logits (q k^T / sqrt(d), not softmax) of the last
    ViT layer; tokprune's signal is the post-softmax attention, whose crop sums lie in [0, 1] and add up
    to about 1, so temperature 10 would make sigma uniform and give every crop ratio R (no global
    guidance). The default temperature 0.1 keeps the allocation adaptive on that scale (a crop holding 0.4
    of the thumbnail attention, among 4 crops with 0.2 each, gets sigma ≈ 0.71); it is tokprune's choice
    for post-softmax sums, not a published number. `layer=-1` selects the code's last layer (its [CLS]
    attention is still post-softmax here). (2) A crop's thumbnail area comes from the unpadded crop mosaic
    (the code splits the thumbnail into equal blocks for the ratios, but resizes onto the unpadded mosaic
    for the token scores, as here). (3) Exactly k tokens: the ratios keep the paper's proportions between
    crops but are scaled by a common factor so that the counts sum to k (R itself when the crops are
    equal; the paper's r_j * size_j does not sum to R times the crops' tokens when unpadding makes them
    unequal), and a crop's ratio is capped at 1 with the excess re-shared (the code clips at 1 and
    truncates each count, keeping fewer). (4) Ties go to the lower index.
    Needs tiles: `tokprune.apply` refuses models without them (`needs_tiles`).
    """

    name = "globalcom2"
    family = "high-res, thumbnail-guided (AnyRes only)"
    where = "pre"
    default_budget = Budget(ratio=0.25)
    paper = "Liu et al., arXiv:2501.05179 (GlobalCom²)"
    needs_tiles = True

    temperature: float = 0.1
    alpha: float = 0.5
    layer: int | None = None

    def __post_init__(self) -> None:
        check_number(self, "temperature", 0, low_open=True)
        check_number(self, "alpha", 0, 1)
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
            glob, local = F.normalize(glob, dim=0), F.normalize(attention[idx], dim=0)
            score = self.alpha * glob + (1.0 - self.alpha) * local
            kept.append(idx[topk_sorted(score, q)])
        return Selection(keep=torch.cat(kept).sort().values)
