"""GlobalCom²: the thumbnail (AnyRes base view) commands the compression of the high-resolution crops."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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
from tokprune.methods.options import check_choice, check_number, check_vision_layer

_SCORES = {"logits": "cls_logits", "attention": "cls_attention"}
_CROP_AREAS = ("blocks", "unpadded")
_ALLOCATIONS = ("code", "proportional")
_TEMPERATURE = {"logits": 10.0, "attention": 0.1}  # the code's; tokprune's for post-softmax sums


def tile_grid(mosaic: Mosaic) -> list[tuple[int, int]]:
    """(tile row, tile column) of every tile of the mosaic in its tile grid (rows / columns of tiles are
    the distinct origin rows / columns)."""
    rows = sorted({r for r, _ in mosaic.origins})
    cols = sorted({c for _, c in mosaic.origins})
    return [(rows.index(r), cols.index(c)) for r, c in mosaic.origins]


def block_regions(mosaic: Mosaic) -> torch.Tensor:
    """(n_base,) long: the tile whose *block* of the thumbnail holds every base-view token (row-major), as
    the authors' code assigns them for the crop ratios: the S_h x S_w thumbnail cut into equal blocks of
    S_h // rows x S_w // cols tokens by the tile grid (rows x cols tiles), the remainder going to the
    last row / column of blocks; unpadding is not taken into account. -1 where no tile sits at a block
    (a tile wholly in the unpadded margin)."""
    s_h, s_w = mosaic.base.grid
    cells = tile_grid(mosaic)
    n_rows, n_cols = 1 + max(r for r, _ in cells), 1 + max(c for _, c in cells)
    device = mosaic.base.index.device
    block_h, block_w = max(s_h // n_rows, 1), max(s_w // n_cols, 1)
    row = (torch.arange(s_h, device=device) // block_h).clamp(max=n_rows - 1)
    col = (torch.arange(s_w, device=device) // block_w).clamp(max=n_cols - 1)
    owner = torch.full((n_rows, n_cols), -1, dtype=torch.long, device=device)
    for t, (r, c) in enumerate(cells):
        owner[r, c] = t
    return owner[row[:, None], col[None, :]].reshape(-1)


def crop_sigma(region: torch.Tensor, thumbnail: torch.Tensor, n_crops: int, temperature: float) -> np.ndarray:
    """(n_crops,) float64 softmax over the crops of their summed thumbnail scores / temperature, as the
    code computes it: max-shifted, with 1e-8 added to the denominator. region: (n_base,) the crop of every
    thumbnail token (-1: none)."""
    sums = np.zeros(n_crops)
    for crop, value in zip(region.tolist(), thumbnail.double().tolist()):
        if crop >= 0:
            sums[crop] += value
    shifted = np.exp((sums - sums.max()) / temperature)
    return shifted / (shifted.sum() + 1e-8)


def code_counts(targets: list[float], sizes: list[int], k: int) -> list[int]:
    """Integer counts summing to min(k, sum(sizes)), each within [0, size]: the code's int(target) (floor)
    for every part, then one more for the parts with the largest remainder target - count while the sum is
    short of k, one less for those with the smallest while it exceeds k (ties: the earlier part)."""
    k = min(k, sum(sizes))
    counts = [min(size, max(0, math.floor(t))) for t, size in zip(targets, sizes)]
    while sum(counts) < k:
        open_parts = [i for i in range(len(sizes)) if counts[i] < sizes[i]]
        best = max(open_parts, key=lambda i: (targets[i] - counts[i], -i))
        counts[best] += 1
    while sum(counts) > k:
        open_parts = [i for i in range(len(sizes)) if counts[i] > 0]
        worst = min(open_parts, key=lambda i: (targets[i] - counts[i], i))
        counts[worst] -= 1
    return counts


def crop_weights(mosaic: Mosaic, thumbnail: torch.Tensor, temperature: float) -> list[float]:
    """`proportional_weights` with every crop's area of the unpadded image (`Mosaic.base_regions`)."""
    sizes = [t.index.numel() for t in mosaic.tiles]
    return proportional_weights(mosaic.base_regions(), thumbnail, sizes, temperature)


def proportional_weights(
    region: torch.Tensor, thumbnail: torch.Tensor, sizes: list[int], temperature: float
) -> list[float]:
    """Weight of every crop in the crops' share of the budget (`allocation="proportional"`):
    size_i * (1 + sigma_i - 1 / N).

    region: (n_base,) the crop of every thumbnail token (-1: none); thumbnail: (n_base,) its scores,
    row-major. s_i = the thumbnail scores in crop i's region, sigma = softmax(s / temperature) over the N
    crops (the paper's max-shifted softmax; its epsilon in the denominator is left out). The paper gives
    crop i the retention ratio r_i = R (1 + sigma_i - 1 / N); weighting by size keeps the ratios of the
    crops in exactly those proportions, and on crops of equal size the shares are exactly r_i * size_i
    (the weights sum to N * size, so the common factor is R).
    """
    n_crops = len(sizes)
    region = region.to(thumbnail.device)
    valid = region >= 0
    scores = torch.zeros(n_crops, dtype=torch.float32, device=thumbnail.device)
    scores.index_add_(0, region[valid], thumbnail.float()[valid])
    sigma = torch.softmax(scores / temperature, dim=0).tolist()
    return [size * (1.0 + s - 1.0 / n_crops) for size, s in zip(sizes, sigma)]


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


def emission_order(keep_base: torch.Tensor, keep_crops: list[torch.Tensor], mosaic: Mosaic) -> torch.Tensor:
    """(k,) the rank each kept token has in the order the code hands them to the LLM, in the order of
    torch.cat([keep_base, *keep_crops]).

    keep_base: the thumbnail's kept tokens in descending score order (the code emits them so);
    keep_crops: per tile, the kept tokens' local indices among the tile's tokens (row-major). The code
    then lays every crop's kept tokens out on the *padded* tile mosaic (tile_side x tile_side per tile)
    and emits them in its raster order, placing a token of local index t at row t // S_w, column
    t % S_w of its tile (a full tile is S_h x S_w, the base view's grid): for a tile that unpadding
    shortened, that is not where the token lies (the code puts the index among the tile's remaining tokens
    into the full tile), and tokprune follows it.
    """
    s_h, s_w = mosaic.base.grid
    cells = tile_grid(mosaic)
    width = (1 + max(c for _, c in cells)) * s_w
    keys = []
    for local, (r, c) in zip(keep_crops, cells):
        local = local.cpu()
        row = r * s_h + torch.div(local, s_w, rounding_mode="floor")
        keys.append(row * width + c * s_w + local % s_w)
    crop_keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long)
    n_base = keep_base.numel()
    ranks = torch.empty(n_base + crop_keys.numel(), dtype=torch.long)
    ranks[:n_base] = torch.arange(n_base)
    ranks[n_base:] = n_base + crop_keys.cpu().argsort(stable=True).argsort()
    return ranks


@dataclass
class GlobalCom2(Method):
    """GlobalCom² — Liu et al., "Global Compression Commander: Plug-and-Play Inference Acceleration for
    High-Resolution Large Vision-Language Models", AAAI 2026 (arXiv:2501.05179; v1-v2 titled
    "Compression with Global Guidance: Towards Training-free High-Resolution MLLMs Acceleration").
    AnyRes only.

    An AnyRes image is a thumbnail (the base view: the whole image at tile resolution) plus crops (the
    high-resolution tiles, unpadded). The defaults follow the authors' code (github.com/xuyang-liu16/
    GlobalCom2, commit 96b2d00b: `llava/model/llava_arch.py` `prepare_inputs_labels_for_multimodal`,
    `compress_thumbnail`, `generate_scale_for_crop_features`, `compress_crops`,
    `interpolate_and_split_cls_attn_scores`, `select_topk_crop_features`;
    `llava/model/multimodal_encoder/apply_customvit.py`; tests/agreement/ref_globalcom2.py). For k kept
    tokens of the image's n content tokens (row-end separators excluded), retention ratio R = k / n:
      0. scores: the [CLS] query's head-mean *pre-softmax* logits q k^T / sqrt(d) at the *last* ViT layer
         ("cls_logits@-1", `score="logits"`, `layer=-1`), each view's from its own ViT pass;
      1. thumbnail: its floor(n_base R) tokens of highest score;
      2. crop retention ratios: crop j's global score s_j is the sum of the thumbnail scores in its block
         of the thumbnail (`crop_areas="blocks"`: the thumbnail cut into equal blocks by the tile grid,
         `block_regions`); sigma = softmax(s / temperature) over the N crops, temperature 10 (max-shifted,
         with the code's 1e-8 in the denominator); r_j = min(1, R (1 + sigma_j - mean(sigma))); crop j keeps
         floor(N_j r_j) of its N_j (unpadded) tokens (`allocation="code"`);
      3. tokens in a crop: score = alpha g + (1 - alpha) l, g the thumbnail's score map resized bilinearly
         (half-pixel centres) onto the unpadded crop mosaic and cut to the crop, l the crop's own scores,
         each L2-normalised over the crop; the code adds them (alpha = 0.5, the same ranking); the top
         counts of step 2 are kept.
    Exactly k tokens: the floors of steps 1-2 sum to at most k on equal crops (and may differ from k
    where unpadding makes the crops unequal), so the difference goes one token at a time to the parts with
    the largest remainders (or is taken from those with the smallest, `code_counts`); the code keeps the
    floors (up to N + 1 tokens fewer).
    Order (`Selection.order`, used by `order="selection"`): the thumbnail's kept tokens in descending
    score, then the crops' in the code's raster order over the padded tile mosaic (`emission_order`).

    Options (each earlier tokprune default is a value):
      score: "logits" (default, the code) | "attention": the post-softmax [CLS] attention ("cls_attention"),
          which towers without [CLS] (SigLIP: LLaVA-OneVision) also give (the attention each patch
          receives); "logits" is refused on them when the method is applied;
      layer: -1 (default, the code's last layer) | None: the layer feeding the projector | any vision layer;
      temperature: None (default) = 10 for "logits" (the code's) and 0.1 for "attention" (tokprune's
          choice: post-softmax crop sums lie in [0, 1], so 10 would make sigma uniform); or a number > 0;
      crop_areas: "blocks" (default, the code) | "unpadded": s_j sums the thumbnail tokens whose centre
          lies in crop j's area of the unpadded image (`Mosaic.base_regions`), the area the token scores
          of step 3 use;
      allocation: "code" (default) | "proportional": the thumbnail keeps its size share of k and the crops
          share the rest in proportion to N_j (1 + sigma_j - 1/N), capped at their sizes with the overflow
          re-shared (`crop_weights`, `allocate_quotas`): the paper's ratios between crops, exactly;
      alpha: 0.5 (default) in [0, 1]: the weight of g (1: the global score alone, 0: the crop's own).
    The earlier default: score="attention", layer=None, crop_areas="unpadded", allocation="proportional".

    Budget mapping: the published retention ratio 0.25 = default keep_ratio 0.25 of the image's content
    tokens (the code's module-level `retention_ratio`). An image without a base view and tiles (a video
    clip, an image of a several-image LLaVA-OneVision prompt) raises an UnsupportedInputError (a
    ValueError) that says what to use instead. Needs tiles: `tokprune.apply` refuses models without them
    (`needs_tiles`).

    Deliberate differences from the authors' code: (1) exactly k tokens (above); (2) row-end newline
    tokens: the code keeps one after every row of the *padded* tile mosaic (also rows that unpadding
    removed); a pruned image here loses its separators (the engine's rule); (3) kept tokens sit at their
    own places in the sequence by default (the code's order only with `order="selection"`); (4) the code
    scores with the tower's attention at its own precision (fp16 in its scripts), tokprune in float32
    from the layer's q/k; (5) the code splits the thumbnail into blocks of the *full* tile grid, which
    can include tiles that unpadding removes altogether (not with LLaVA-NeXT's grid pinpoints); tokprune
    only sees the tiles that have tokens, so such tiles do not get a block (their sigma would enter the
    code's mean); (6) several images in one batch: the code reads the first image's thumbnail scores for
    every image (it indexes `cls_attn_scores[0]`), tokprune each image's own; (7) ties go to the lower
    index.
    """

    name = "globalcom2"
    family = "high-res, thumbnail-guided (AnyRes only)"
    where = "pre"
    default_budget = Budget(ratio=0.25)
    paper = "Liu et al., arXiv:2501.05179 (GlobalCom²)"
    needs_tiles = True
    code_families = ("llava_next",)

    score: str = "logits"
    layer: int | None = -1
    temperature: float | None = None
    crop_areas: str = "blocks"
    allocation: str = "code"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        check_choice(self, "score", tuple(_SCORES))
        check_vision_layer(self, "layer", optional=True)
        check_number(self, "temperature", 0, low_open=True, optional=True)
        check_choice(self, "crop_areas", _CROP_AREAS)
        check_choice(self, "allocation", _ALLOCATIONS)
        check_number(self, "alpha", 0, 1)

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return (vision_signal(_SCORES[self.score], self.layer),)

    @property
    def tau(self) -> float:
        """The temperature in use: the option, or the score's default."""
        return _TEMPERATURE[self.score] if self.temperature is None else self.temperature

    def select(self, image: ImageTokens, k: int) -> Selection:
        if (trivial := trivial_selection(image, k)) is not None:
            return trivial
        mosaic = anyres_mosaic(image, self.name)  # first: a plain image gets the AnyRes error
        device = image.embeds.device
        scores = image.signals[self.signals[0]].to(device).float().reshape(-1)
        base = mosaic.base.index.to(device)
        crops = [t.index.to(device) for t in mosaic.tiles]
        sizes = [c.numel() for c in crops]
        thumbnail = scores[base]
        k_base, quotas = self._counts(mosaic, thumbnail, base.numel(), sizes, k, image.n)
        keep_base = torch.sort(thumbnail, descending=True, stable=True).indices[:k_base]
        kept_local = []
        for idx, glob, q in zip(crops, global_crop_scores(mosaic, thumbnail), quotas):
            glob, local = F.normalize(glob, dim=0), F.normalize(scores[idx], dim=0)
            kept_local.append(topk_sorted(self.alpha * glob + (1.0 - self.alpha) * local, q))
        kept = torch.cat([base[keep_base], *[idx[t] for idx, t in zip(crops, kept_local)]])
        keep, by_slot = kept.sort()
        ranks = emission_order(keep_base, kept_local, mosaic)
        order = ranks.to(device)[by_slot].argsort()
        return Selection(keep=keep, order=order)

    def _counts(
        self, mosaic: Mosaic, thumbnail: torch.Tensor, n_base: int, sizes: list[int], k: int, n: int
    ) -> tuple[int, list[int]]:
        """(tokens kept of the thumbnail, of every crop), summing to k."""
        region = block_regions(mosaic) if self.crop_areas == "blocks" else mosaic.base_regions()
        if self.allocation == "proportional":
            k_base, k_crops = split_budget(k, [n_base, sum(sizes)])
            weights = proportional_weights(region, thumbnail, sizes, self.tau)
            return k_base, allocate_quotas(weights, sizes, k_crops)
        sigma = crop_sigma(region.cpu(), thumbnail.cpu(), len(sizes), self.tau)
        ratio = k / n
        crop_ratios = np.minimum(ratio * (1.0 + sigma - sigma.mean()), 1.0)
        targets = [n_base * ratio] + [size * r for size, r in zip(sizes, crop_ratios.tolist())]
        counts = code_counts(targets, [n_base, *sizes], k)
        return counts[0], counts[1:]
