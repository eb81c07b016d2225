"""Videos on the Qwen family: the DESIGN §8 invariants with video clips beside images.

transformers' video processors need torchvision, which is not installed, so `video_batch` lays videos out
itself, as Qwen2VLVideoProcessor and Qwen3VLProcessor do:
  * pixel_values_videos: frames (T, 3, H, W) with H, W multiples of patch * merge, normalised with the
    image processor's mean / std, cut into (temporal_patch x patch x patch) patches in the video
    processor's order (temporal slice, merged row, merged column, row in the 2x2 group, column in it;
    each patch flattened as (C, temporal, patch, patch)); video_grid_thw = (T / 2, H / 14, W / 14);
  * the prompt: Qwen2-VL / Qwen2.5-VL write `<|vision_start|>` + t*h*w/4 `<|video_pad|>` + `<|vision_end|>`;
    Qwen3-VL writes, per temporal slice, a timestamp ("<0.5 seconds>"; a word of the tiny vocabulary
    here) + `<|vision_start|>` + h*w/4 pads + `<|vision_end|>`;
  * mm_token_type_ids: 1 on image pads, 2 on video pads (ProcessorMixin.create_mm_token_type_ids).
Images go through the tiny models' image processor. Token counts per clip / image come from the grids
(not from tokprune). The budget rule checked: a clip is one item ranked as a whole; `budget=k` keeps k per
temporal slice (frame) of it with video_budget="frame" (the default) and k per clip with "clip".
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import stage_plan
from test_invariants import (
    TINY_OPTIONS,
    LayerLengthProbe,
    assert_keep_all_identical,
    assert_matches_reference,
    assert_restored,
    run_pruned,
    unpatched_outputs,
)
from test_signals import _capture_eager
from tiny_models import rand_image
from tokprune.patches import adapter_for
from video_budgets import COMPOSITION, VIDEO_BUDGETS, expected_stage_kept

import tokprune
from tokprune.core.budget import Budget
from tokprune.methods import REGISTRY

METHODS = tokprune.available_methods()
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
BACKENDS = ["sdpa", "eager"]
# items per batch row, in prompt order: a video row beside an image row; both kinds in both rows, in
# opposite orders (the sequence order [video 0, image 0, image 1, video 1] is neither kind's own order)
LAYOUTS = {
    "video|image": (("video",), ("image",)),
    "video+image|image+video": (("video", "image"), ("image", "video")),
}
VIDEOS = ((4, 56, 84), (6, 84, 56))  # (frames, height, width): 2 x (2x3) and 3 x (3x2) LLM tokens
IMAGES = ((112, 112), (112, 168))
WORDS = ("describe the video please", "w1 w2 w3 w4 w5 w6 w7 w8 describe the video")
RATIO = 0.25


def _frames(n: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).integers(0, 255, (n, height, width, 3), dtype=np.uint8)


def video_pixels(frames: np.ndarray, image_processor) -> tuple[torch.Tensor, list[int]]:
    """(T, H, W, 3) uint8 frames -> pixel_values_videos (t*h*w, 3*tp*p*p) and the grid [t, h, w]."""
    p, m, tp = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    video = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - mean) / std  # (T, 3, H, W)
    n, c, height, width = video.shape
    t, h, w = n // tp, height // p, width // p
    patches = video.reshape(t, tp, c, h // m, m, p, w // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, tp, p, p)
    return patches.reshape(t * h * w, c * tp * p * p), [t, h, w]


def _video_text(family: str, grid: list[int]) -> str:
    t, h, w = grid
    if family == "qwen3_vl":  # one timestamped block per temporal slice
        frame = "<|video_pad|>" * (h * w // 4)
        return " ".join(f"w{40 + i} <|vision_start|>{frame}<|vision_end|>" for i in range(t))
    return "<|vision_start|>" + "<|video_pad|>" * (t * h * w // 4) + "<|vision_end|>"


def video_batch(family: str, proc, rows) -> tuple[dict, list[list[int]]]:
    """A left-padded batch whose rows hold the given items; also the LLM tokens of every row's items."""
    ip = proc.image_processor
    texts, images, videos, grids, row_counts = [], [], [], [], []
    for r, items in enumerate(rows):
        parts, counts = [], []
        for kind in items:
            if kind == "image":
                h, w = IMAGES[len(images) % len(IMAGES)]
                images.append(rand_image(h, w, len(images)))
                grid = ip(images=[images[-1]], return_tensors="pt")["image_grid_thw"][0].tolist()
                parts.append(
                    "<|vision_start|>"
                    + "<|image_pad|>" * (grid[0] * grid[1] * grid[2] // 4)
                    + "<|vision_end|>"
                )
            else:
                pixels, grid = video_pixels(_frames(*VIDEOS[len(videos) % len(VIDEOS)], len(videos)), ip)
                videos.append(pixels)
                grids.append(grid)
                parts.append(_video_text(family, grid))
            counts.append(grid[0] * grid[1] * grid[2] // 4)
        texts.append(f"USER: {' '.join(parts)} {WORDS[r % 2]} ASSISTANT:")
        row_counts.append(counts)
    tok = proc.tokenizer
    inputs = dict(tok(texts, return_tensors="pt", padding=True))
    ids = inputs["input_ids"]
    image_id, video_id = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    inputs["mm_token_type_ids"] = (ids == image_id).long() + 2 * (ids == video_id).long()
    if images:
        inputs.update(ip(images=images, return_tensors="pt"))
    if videos:
        inputs["pixel_values_videos"] = torch.cat(videos)
        inputs["video_grid_thw"] = torch.tensor(grids)
    return inputs, row_counts


def _needs_tiles(method: str) -> bool:
    """AnyRes-only methods, refused on Qwen (the invariant matrix checks the refusal)."""
    return bool(getattr(REGISTRY[method], "needs_tiles", False))


# ---------------------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_lists_images_and_clips_in_sequence_order(tiny, family):
    model, proc = tiny(family, "sdpa")
    inputs, row_counts = video_batch(family, proc, LAYOUTS["video+image|image+video"])
    layout = adapter_for(model).image_layout(inputs)
    assert layout.counts == [n for counts in row_counts for n in counts]  # video 0, image 0, image 1, video 1
    for index in (0, 3):  # the clips: one unit per temporal slice, each a full (h/2, w/2) grid
        t, h, w = inputs["video_grid_thw"][index // 3].tolist()
        units = layout.units[index]
        assert layout.grids[index] is None and [u.kind for u in units] == ["frame"] * t
        assert all(u.grid == (h // 2, w // 2) for u in units)
        assert torch.equal(torch.cat([u.index for u in units]), torch.arange(layout.counts[index]))
    assert layout.units[1] is None and layout.units[2] is None  # plain images
    grid = inputs["image_grid_thw"][0].tolist()
    assert layout.grids[1] == (grid[1] // 2, grid[2] // 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_vit_signals_of_images_and_videos_follow_sequence_order(tiny, monkeypatch, family):
    """The engine's "cls_attention" (attention received at the block feeding the merger) equals the eager
    maps of the image pass and the video pass, put in sequence order."""
    import importlib

    from transformers.vision_utils import get_vision_window_index

    model, proc = tiny(family, "eager")
    modeling = importlib.import_module(type(model).__module__)
    inputs, _ = video_batch(family, proc, LAYOUTS["video+image|image+video"])
    visual = model.model.visual
    adapter = adapter_for(model)
    maps = _capture_eager(monkeypatch, modeling, visual.blocks[adapter.score_layer].attn)
    with tokprune.apply(model, "fastervlm", keep_ratio=RATIO) as pruner, torch.no_grad():
        model(**inputs)
        got = pruner._engine.store.values["cls_attention"]
    group = visual.spatial_merge_size**2

    def pooled(grids: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per item: column mean of its maps (one per image / temporal slice), pooled, in raster order."""
        received = torch.cat([m[0].mean(dim=(0, 1)) for m in weights]).view(-1, group).mean(1)
        if family == "qwen2_5_vl":  # blocks run in window order
            window_index, _ = get_vision_window_index(
                grids, spatial_merge_size=2, window_size=visual.window_size, patch_size=visual.patch_size
            )
            raster = torch.empty_like(received)
            raster[window_index] = received
            received = raster
        return list(received.split((grids.prod(-1) // group).tolist()))

    n_image_maps = len(inputs["image_grid_thw"])  # the image pass runs first: one map per image
    images = pooled(inputs["image_grid_thw"], maps[:n_image_maps])
    videos = pooled(inputs["video_grid_thw"], maps[n_image_maps:])
    assert len(maps) == n_image_maps + int(inputs["video_grid_thw"][:, 0].sum())  # one map per temporal slice
    expected = torch.cat([videos[0], images[0], images[1], videos[1]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical_with_videos(tiny, family, attn, method):
    if _needs_tiles(method):
        pytest.skip("AnyRes-only method")
    model, proc = tiny(family, attn)
    layout = "video+image|image+video"
    inputs, _ = video_batch(family, proc, LAYOUTS[layout])
    assert_keep_all_identical(
        model, inputs, method, unpatched_outputs(family, attn, f"videos {layout}", inputs)
    )


def _expected_layer_tokens(model, inputs, pruner, row_counts: list[list[int]]) -> list[list[int]]:
    """Per row and layer: text tokens + per item (image or whole clip) the count its stage says."""
    ids = inputs["input_ids"]
    visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    text = (inputs["attention_mask"].bool() & ~visual).sum(1).tolist()
    n_layers = len(model.model.language_model.layers)
    assert pruner.budgets[-1] == Budget(ratio=RATIO)
    items = [n for counts in row_counts for n in counts]
    bounds, stages = stage_plan(pruner, items, n_layers)  # a composite method is installed as its stages
    expected = []
    for row, counts in enumerate(row_counts):
        first = sum(len(c) for c in row_counts[:row])
        mine = range(first, first + len(counts))
        per_stage = [text[row] + sum(min(kept[i], items[i]) for i in mine) for kept in stages]
        layers = []
        for i in range(n_layers):
            passed = [s for s, b in enumerate(bounds) if i >= b]
            layers.append(per_stage[passed[-1]] if passed else text[row] + sum(counts))
        expected.append(layers)
    return expected


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_pruned_with_videos_equals_masked_reference(tiny, family, attn, method, layout):
    """Prefill (every real position) and every decode step equal the masked reference; per-layer counts
    follow the budget; the batch is left-padded; remove() restores prefill and generate()."""
    if _needs_tiles(method):
        pytest.skip("AnyRes-only method")
    model, proc = tiny(family, attn)
    inputs, row_counts = video_batch(family, proc, LAYOUTS[layout])
    assert not inputs["attention_mask"].bool().all(1).all()  # a left-padded row
    unpatched = unpatched_outputs(family, attn, f"videos {layout}", inputs)
    pruner = tokprune.apply(model, method, keep_ratio=RATIO, **TINY_OPTIONS.get(method, {}))
    probe = LayerLengthProbe(model)

    def counts(stats) -> None:
        expected = _expected_layer_tokens(model, inputs, pruner, row_counts)
        assert stats.layer_tokens == expected
        assert [n for _, n in probe.lengths] == [max(r[i] for r in expected) for i in range(len(expected[0]))]
        assert stats.visual_in == [sum(c) for c in row_counts]
        probe.remove()

    try:
        prefill, generated = run_pruned(model, inputs, pruner, counts)
    finally:
        probe.remove()
    assert_matches_reference(model, inputs, prefill, generated)
    assert_restored(model, inputs, unpatched)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("method", ["visionzip", "pdrop"])
def test_beams_prune_every_copy_of_a_clip_alike(tiny, family, method):
    """generate() encodes images and videos once, then repeats rows: layout and ViT signals follow."""
    model, proc = tiny(family, "sdpa")
    inputs, _ = video_batch(family, proc, LAYOUTS["video+image|image+video"])
    with tokprune.apply(model, method, keep_ratio=RATIO) as pruner, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False,
                             pad_token_id=0)  # fmt: skip
        expanded = pruner.stats.kept
        model(**inputs)
        single = pruner.stats.kept
    assert out.shape[0] == 4
    for row in range(2):
        for copy in range(2):
            assert torch.equal(expanded[2 * row + copy], single[row])


# ------------------------------------------------------------------------------ the budget unit of a clip

BUDGET = 2  # clips of 2 x 6 and 3 x 6 tokens, images of 16 and 24: 2 per frame is below half of every item


def _items_with_frames(inputs: dict, rows, row_counts: list[list[int]]) -> list[tuple[int, int, int, int]]:
    """(row, tokens, content tokens, frames) of every item in sequence order; a clip's frames are its
    temporal slices (t of video_grid_thw, videos numbered in prompt order), an image has 0."""
    items, video = [], 0
    for row, (kinds, counts) in enumerate(zip(rows, row_counts)):
        for kind, n in zip(kinds, counts):
            frames = int(inputs["video_grid_thw"][video][0]) if kind == "video" else 0
            video += kind == "video"
            items.append((row, n, n, frames))
    return items


@pytest.mark.parametrize("video_budget", VIDEO_BUDGETS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", [*METHODS, "composition"])
def test_video_budget_counts_per_frame_or_per_clip(tiny, family, method, video_budget):
    """Every stage of every method (multi-stage ones and a composition included) keeps of a clip of t frames
    what a budget of BUDGET * t ("frame") or BUDGET ("clip") gives, and BUDGET of an image."""
    if method != "composition" and _needs_tiles(method):
        pytest.skip("AnyRes-only method")
    model, proc = tiny(family, "sdpa")
    rows = LAYOUTS["video+image|image+video"]
    inputs, row_counts = video_batch(family, proc, rows)
    spec, options = (COMPOSITION, {}) if method == "composition" else (method, TINY_OPTIONS.get(method, {}))
    with (
        torch.no_grad(),
        tokprune.apply(model, spec, budget=BUDGET, video_budget=video_budget, **options) as pruner,
    ):
        model(**inputs)
    items = _items_with_frames(inputs, rows, row_counts)
    n_layers = len(model.model.language_model.layers)
    assert [s.visual_kept for s in pruner.stats.stages] == expected_stage_kept(
        pruner, items, n_layers, video_budget
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_video_budget_exact_counts_and_same_ratio(tiny, family):
    """Row 0: a clip of 2 frames + an image; row 1: an image + a clip of 3 frames. budget=3 keeps 2 * 3 + 3
    and 3 + 3 * 3 per frame, 3 + 3 per clip; keep_ratio keeps the same tokens in both modes."""
    model, proc = tiny(family, "sdpa")
    inputs, row_counts = video_batch(family, proc, LAYOUTS["video+image|image+video"])
    assert inputs["video_grid_thw"][:, 0].tolist() == [2, 3]
    kept = {}
    for video_budget in VIDEO_BUDGETS:
        with torch.no_grad(), tokprune.apply(model, "random", budget=3, video_budget=video_budget) as pruner:
            model(**inputs)
        kept[video_budget] = pruner.stats.visual_kept
        with (
            torch.no_grad(),
            tokprune.apply(model, "random", keep_ratio=0.25, video_budget=video_budget) as pruner,
        ):
            model(**inputs)
        kept[video_budget, "ratio"] = pruner.stats.kept
    assert kept["frame"] == [2 * 3 + 3, 3 + 3 * 3]
    assert kept["clip"] == [3 + 3, 3 + 3]
    assert [int(k.numel()) for k in kept["frame", "ratio"]] == [
        sum(math.ceil(0.25 * n) for n in counts) for counts in row_counts
    ]
    assert all(torch.equal(a, b) for a, b in zip(kept["frame", "ratio"], kept["clip", "ratio"]))
