"""Test-only reading of HoloV's released selection, written from the authors' code (not copied).

Source: github.com/obananas/HoloV, commit 1d2e65e961e698ff0e7d5bb4625489177dd9deba,
  * `llava/model/utils.py`, `HoloV(image_tokens, attention, num_patches, new_image_token_num, esp)`: the
    selection (the Qwen2.5-VL copy `qwen-model-HoloV/utils.py` is the same with alpha / beta / power named);
  * `llava/model/llava_arch.py`, `encode_images` (attention = head mean of the [CLS] row, features = the
    projector's output) and `prepare_inputs_labels_for_multimodal` (`HoloV(..., num_patches=16,
    new_image_token_num=64)` on every image; on the anyres path the image is the base view followed by the
    unpadded tile mosaic in raster order, the `image_newline` concatenation commented out, attention
    gathered the same way);
  * `llava/model/multimodal_encoder/clip_encoder.py`, `feature_select`: attention = `attentions[select_layer]
    [:, :, 0, 1:]` (the layer whose output is the feature, -2 on LLaVA).

What the code does for one image of N tokens (features F, attention a), in words: cut the N tokens, in
order, into 16 runs, N // 16 each and the first N % 16 runs one longer. In a run of m >= 2 tokens: cosine
similarities of the run's normalised features (norm + 1e-6), diagonal zeroed; per token the mean over the
m - 1 others and the squared deviations summed over the whole row (zeroed diagonal included) over m - 1;
attention times 1000; lambda = mean |scaled attention| / (mean |variance| + 1e-6); token score = scaled
attention + 0.09 * lambda * variance; run score = its mean. A one-token run scores its raw attention.
Weights = run scores / (their sum + 1e-6); run r gets floor(weight * 64) and the leftover tokens go one
each to the runs of largest weight. A run whose share is at least its size is emitted whole (token order);
otherwise its share of top tokens by attention (torch.topk: decreasing attention). Runs are emitted in
order; missing tokens are zero rows at the end.

Generalised here: the budget k (the code hard-codes 64; the crop count stays 16), any token count.
"""

from __future__ import annotations

import torch

RUNS = 16


def runs(n: int, count: int = RUNS) -> list[range]:
    """The code's runs over n tokens: n // count each, the first n % count one longer, empty runs left out."""
    size, extra = divmod(n, count)
    out, start = [], 0
    for r in range(count):
        length = size + (1 if r < extra else 0)
        if length:
            out.append(range(start, start + length))
        start += length
    return out


def run_score(features: torch.Tensor, attention: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The code's score of one run: features (m, D), attention (m,) -> 0-d tensor."""
    m = features.shape[0]
    if m <= 1:
        return attention.mean()
    unit = features / (features.norm(dim=1, keepdim=True) + eps)
    similarity = unit @ unit.T
    similarity = similarity * (1 - torch.eye(m))
    centre = similarity.sum(1) / (m - 1)
    spread = ((similarity - centre[:, None]) ** 2).sum(1) / (m - 1)
    scaled = attention * 1000.0
    weight = scaled.abs().mean() / (spread.abs().mean() + eps)
    return (scaled + 0.09 * (spread * weight)).mean()


def holov_official(features: torch.Tensor, attention: torch.Tensor, k: int, eps: float = 1e-6) -> list[int]:
    """One image: features (N, D) (projector output), attention (N,) float32. Returns the emitted token
    indices in the code's order (fewer than k where shares exceed their runs; the code pads with zeros)."""
    features = features.float()
    attention = attention.float()
    parts = runs(features.shape[0])
    scores = torch.stack([run_score(features[list(r)], attention[list(r)], eps) for r in parts])
    weights = scores / (scores.sum() + eps)
    shares = (weights * k).floor().long()
    missing = k - int(shares.sum())
    if missing > 0:
        # torch.topk of the weights; ties (never met in these tests) by lower index here
        for r in torch.sort(weights, descending=True, stable=True).indices[:missing].tolist():
            shares[r] += 1
    emitted: list[int] = []
    for r, share in zip(parts, shares.tolist()):
        if share <= 0:
            continue
        if share >= len(r):
            emitted += list(r)
            continue
        top = torch.sort(attention[list(r)], descending=True, stable=True).indices[:share]
        emitted += [r[i] for i in top.tolist()]
    return emitted[:k]


def llava_inputs(vision, projector, image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA-1.5: (features (576, D) after the projector, attention (576,)) of one image."""
    features = projector(vision.features[image : image + 1])[0]
    attention = vision.attentions[-2][image][:, 0, 1:].mean(0).float()
    return features, attention


def llava_unpad_rows_cols(size_hw: tuple[int, int], mosaic_hw: tuple[int, int]) -> tuple[slice, slice]:
    """The LLaVA repository's `unpad_image` on a (H, W) token mosaic for an image of `size_hw` (height,
    width): the rows / columns it keeps (int() of the scaled side, the margin split evenly)."""
    height, width = size_hw
    rows, cols = mosaic_hw
    if width / height > cols / rows:
        new_rows = int(height * (cols / width))
        pad = (rows - new_rows) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new_cols = int(width * (rows / height))
    pad = (cols - new_cols) // 2
    return slice(0, rows), slice(pad, cols - pad)


def anyres_sequence(per_tile: torch.Tensor, tiles_hw: tuple[int, int], size_hw: tuple[int, int]):
    """The code's anyres token sequence of one image from per-tower-input rows (1 + T, 576, ...): the base
    view's 576, then the tile mosaic (tiles_hw tiles of 24 x 24, row-major), unpadded, in raster order, no
    newlines. Returns (sequence (N, ...), mosaic width W after unpadding)."""
    side = round(per_tile.shape[1] ** 0.5)
    th, tw = tiles_hw
    rest = per_tile.shape[2:]
    tiles = per_tile[1:].reshape(th, tw, side, side, *rest)
    mosaic = tiles.transpose(1, 2).reshape(th * side, tw * side, *rest)
    rows, cols = llava_unpad_rows_cols(size_hw, (th * side, tw * side))
    mosaic = mosaic[rows, cols]
    return torch.cat([per_tile[0], mosaic.reshape(-1, *rest)]), mosaic.shape[1]


def to_placeholders(sequence_index: list[int], n_base: int, width: int) -> list[int]:
    """Positions in the code's newline-free sequence -> image-placeholder positions of transformers'
    LLaVA-NeXT packing (a newline after every mosaic row of `width` tokens)."""
    out = []
    for i in sequence_index:
        if i < n_base:
            out.append(i)
        else:
            row, col = divmod(i - n_base, width)
            out.append(n_base + row * (width + 1) + col)
    return out
