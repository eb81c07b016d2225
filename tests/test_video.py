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
(not from tokprune). The budget rule checked: a clip is one item, budgeted as a whole.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import LMInputRecorder, StageInputRecorder, original_positions, reference_logits, stage_plan
from test_invariants import (
    TINY_OPTIONS,
    TOL,
    LayerLengthProbe,
    _generate,
    _pre,
    _prefill,
    _scale,
    assert_keep_all_identical,
)
from test_signals import _capture_eager
from tiny_models import rand_image
from tokprune.patches import adapter_for

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
    inputs, _ = video_batch(family, proc, LAYOUTS["video+image|image+video"])
    assert_keep_all_identical(model, inputs, method)


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
    """Prefill and every decode step equal the masked reference; per-layer counts follow the per-clip
    budget; the batch is left-padded; remove() restores."""
    if _needs_tiles(method):
        pytest.skip("AnyRes-only method")
    model, proc = tiny(family, attn)
    inputs, row_counts = video_batch(family, proc, LAYOUTS[layout])
    assert not inputs["attention_mask"].bool().all(1).all()  # a left-padded row
    ref_logits = _prefill(model, inputs)
    pruner = tokprune.apply(model, method, keep_ratio=RATIO, **TINY_OPTIONS.get(method, {}))
    recorder, probe = LMInputRecorder(model), LayerLengthProbe(model)
    streams = StageInputRecorder(model, pruner)  # in-LLM merges (visiondrop) enter the reference as run
    try:
        with torch.no_grad():
            pruned_prefill = model(**inputs, position_ids=original_positions(model, inputs)).logits
        prefill_stats, prefill_embeds = pruner.stats, recorder.embeds
        expected = _expected_layer_tokens(model, inputs, pruner, row_counts)
        assert prefill_stats.layer_tokens == expected
        assert [n for _, n in probe.lengths] == [max(r[i] for r in expected) for i in range(len(expected[0]))]
        assert prefill_stats.visual_in == [sum(c) for c in row_counts]
        probe.remove()
        prefill_hidden, streams.hidden = streams.hidden, {}
        recorder.embeds = None
        tokens, steps = _generate(model, inputs)
        generate_stats, generate_embeds = pruner.stats, recorder.embeds
    finally:
        recorder.remove()
        streams.remove()
        probe.remove()
        pruner.remove()
    reference = reference_logits(
        model, inputs, prefill_stats, _pre(prefill_stats, prefill_embeds), tokens[:, :0], prefill_hidden
    )
    tail = 4  # the text after the visual items is aligned from the right in both sequences
    atol = TOL * _scale(reference)
    torch.testing.assert_close(pruned_prefill[:, -tail:], reference[0][:, -tail:], atol=atol, rtol=0)
    reference = reference_logits(
        model, inputs, generate_stats, _pre(generate_stats, generate_embeds), tokens, streams.hidden
    )
    atol = TOL * _scale(reference)
    torch.testing.assert_close(steps[0], reference[0][:, -1], atol=atol, rtol=0)
    for step in range(1, len(steps)):
        torch.testing.assert_close(steps[step], reference[step], atol=atol, rtol=0)
    assert torch.equal(_prefill(model, inputs), ref_logits)


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
