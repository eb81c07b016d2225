"""LLaVA-OneVision beyond the single-image matrix of test_invariants: videos mixed with images in one
batch, several-image prompts (base views only), the AnyRes layout against the model's own packing, the
ViT signals against eager attention maps, and generate()'s row expansion.

Video inputs: the tiny processor preprocesses frames itself (the real video processor needs torchvision,
see tiny_onevision), so `pixel_values_videos` is (videos, frames, 3, 56, 56) and every `<video>` becomes
frames x 16 + 1 tokens, as the real processor expands it.
"""

from __future__ import annotations

import math

import pytest
import reference
import torch
from reference import stage_plan
from test_invariants import (
    TINY_OPTIONS,
    LayerLengthProbe,
    _prefill,
    assert_keep_all_identical,
    assert_matches_reference,
    assert_restored,
    run_pruned,
    unpatched_outputs,
)
from tiny_onevision import VIDEO_LAYOUTS, onevision_batch, onevision_counts, onevision_video_counts
from tokprune.patches import VisionSignalStore, adapter_for
from tokprune.patches.llava import clip_encoder_layers
from tokprune.patches.llava_onevision import LlavaOnevisionAdapter
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
from video_budgets import COMPOSITION, VIDEO_BUDGETS, expected_stage_kept

import tokprune
from tokprune.core.budget import Budget
from tokprune.errors import UnsupportedInputError, UnsupportedModelError
from tokprune.methods import REGISTRY
from tokprune.methods.anyres import anyres_mosaic
from tokprune.methods.base import ImageTokens

FAMILY = "llava_onevision"
METHODS = tokprune.available_methods()
BACKENDS = ["sdpa", "eager"]
TOL = 1e-5


def _visual(model, input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids == model.config.image_token_id) | (input_ids == model.config.video_token_id)


@pytest.fixture
def video_reference(monkeypatch):
    """The masked reference with `<video>` placeholders counted as visual tokens (stats.kept index them)."""
    monkeypatch.setattr(reference, "visual_mask", _visual)


def _items(model, inputs) -> list[tuple[int, int, int]]:
    """(row, LLM tokens, content tokens) of every image and video in sequence order, from the model itself:
    images fill the `<image>` positions in order, videos the `<video>` positions."""
    ids = inputs["input_ids"]
    per_kind = {}
    if "pixel_values" in inputs:
        per_kind[model.config.image_token_id] = list(zip(*onevision_counts(model, inputs)))
    if "pixel_values_videos" in inputs:
        per_kind[model.config.video_token_id] = list(zip(*onevision_video_counts(model, inputs)))
    items, used = [], dict.fromkeys(per_kind, 0)
    for row in range(ids.shape[0]):
        col = 0
        while col < ids.shape[1]:
            token = int(ids[row, col])
            if token not in per_kind:
                col += 1
                continue
            count, content = per_kind[token][used[token]]
            assert bool((ids[row, col : col + count] == token).all())
            items.append((row, count, content))
            used[token] += 1
            col += count
    return items


def _expected_layer_tokens(pruner, inputs, model, ratio: float) -> list[list[int]]:
    """Per row and decoder layer: text tokens + what every item keeps at the stage the layer belongs to
    (an item below its budget keeps everything, its newline separators included)."""
    valid, visual = inputs["attention_mask"].bool(), _visual(model, inputs["input_ids"])
    n_layers = len(model.model.language_model.layers)
    assert pruner.budgets[-1] == Budget(ratio=ratio)
    items = _items(model, inputs)
    bounds, stages = stage_plan(pruner, [c for _, _, c in items], n_layers)  # composites: their stages
    expected = []
    for row in range(valid.shape[0]):
        text = int((valid[row] & ~visual[row]).sum())
        mine = [i for i, item in enumerate(items) if item[0] == row]
        full = text + sum(items[i][1] for i in mine)
        per_stage = [text + sum(k[i] if k[i] < items[i][2] else items[i][1] for i in mine) for k in stages]
        expected.append([
            per_stage[max(s for s, b in enumerate(bounds) if i >= b)] if i >= bounds[0] else full
            for i in range(n_layers)
        ])  # fmt: skip
    return expected


@pytest.mark.parametrize("layout", list(VIDEO_LAYOUTS))
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical(tiny, method, attn, layout):
    model, proc = tiny(FAMILY, attn)
    inputs = onevision_batch(proc, layout)
    assert_keep_all_identical(
        model, inputs, method, unpatched_outputs(FAMILY, attn, f"videos {layout}", inputs)
    )


@pytest.mark.parametrize("layout", list(VIDEO_LAYOUTS))
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("method", [m for m in METHODS if not REGISTRY[m].needs_tiles])
def test_pruned_equals_masked_reference(tiny, video_reference, method, attn, layout):
    """Prefill (every real position) and every decode step equal the masked reference; exact per-layer token
    counts (the budget counts each clip's content tokens); left padding; remove() restores prefill and
    generate()."""
    model, proc = tiny(FAMILY, attn)
    inputs = onevision_batch(proc, layout)
    assert not inputs["attention_mask"].bool().all(1).all()  # a left-padded row
    unpatched = unpatched_outputs(FAMILY, attn, f"videos {layout}", inputs)
    ratio = 0.25
    pruner = tokprune.apply(model, method, keep_ratio=ratio, **TINY_OPTIONS.get(method, {}))
    probe = LayerLengthProbe(model)
    expected = _expected_layer_tokens(pruner, inputs, model, ratio)

    def counts(stats) -> None:
        assert stats.layer_tokens == expected
        assert [n for _, n in probe.lengths] == [max(r[i] for r in expected) for i in range(len(expected[0]))]
        assert stats.visual_in == _visual(model, inputs["input_ids"]).sum(1).tolist()
        probe.remove()

    try:
        prefill, generated = run_pruned(model, inputs, pruner, counts)
    finally:
        probe.remove()
    # generate() encodes images and videos before its prefill, which prunes the same
    assert generated[2].layer_tokens == expected
    assert_matches_reference(model, inputs, prefill, generated, TOL)
    assert_restored(model, inputs, unpatched)


@pytest.mark.parametrize("layout", list(VIDEO_LAYOUTS))
@pytest.mark.parametrize("method", [m for m in METHODS if REGISTRY[m].needs_tiles])
def test_anyres_only_methods_refuse_clips_and_base_views(tiny, method, layout):
    """HiRED / GlobalCom² rank a base view against its tiles: a video clip or a base-only view of a
    several-image prompt is refused with a clear error, and the model works again after remove()."""
    model, proc = tiny(FAMILY, "sdpa")
    inputs = onevision_batch(proc, layout)
    reference_out = _prefill(model, inputs)
    with tokprune.apply(model, method, keep_ratio=0.25), pytest.raises(ValueError, match="base"):
        _prefill(model, inputs)
    assert torch.equal(_prefill(model, inputs), reference_out)


@pytest.mark.parametrize("video_budget", [None, *VIDEO_BUDGETS])
def test_budget_tokens_count_per_frame_or_per_clip(tiny, video_budget):
    """budget=k keeps k content tokens of every image and, of a clip of 3 frames x 16 tokens, 3k with
    video_budget="frame" (also the default, None here) or k with "clip"; keep_ratio is the same in both."""
    model, proc = tiny(FAMILY, "sdpa")
    inputs = onevision_batch(proc, "mixed")  # every row: one image and one clip
    assert inputs["pixel_values_videos"].shape[1] == 3
    given = {} if video_budget is None else {"video_budget": video_budget}
    with tokprune.apply(model, "random", budget=10, **given) as pruner, torch.no_grad():
        model(**inputs)
    per_clip = 10 if video_budget == "clip" else 3 * 10
    visual = _visual(model, inputs["input_ids"])
    for row in range(2):
        assert pruner.stats.visual_kept[row] == 10 + per_clip
        assert pruner.stats.visual_in[row] == int(visual[row].sum())
    with tokprune.apply(model, "random", keep_ratio=0.25, **given) as pruner, torch.no_grad():
        model(**inputs)
    contents = [c for _, _, c in _items(model, inputs)]
    assert sum(pruner.stats.visual_kept) == sum(math.ceil(0.25 * c) for c in contents)


def _item_frames(model, inputs) -> list[int]:
    """Frames of every item in sequence order, 0 for an image (the rows of the "mixed" layout alternate
    images and clips, so every change of placeholder starts an item)."""
    frames = inputs["pixel_values_videos"].shape[1]
    out = []
    for row in inputs["input_ids"]:
        kinds = torch.unique_consecutive(row[_visual(model, row[None])[0]]).tolist()
        out += [frames if kind == model.config.video_token_id else 0 for kind in kinds]
    return out


@pytest.mark.parametrize("video_budget", VIDEO_BUDGETS)
@pytest.mark.parametrize("method", [*[m for m in METHODS if not REGISTRY[m].needs_tiles], "composition"])
def test_video_budget_counts_per_frame_or_per_clip(tiny, method, video_budget):
    """Every stage of every method (multi-stage ones and a composition included) keeps of a clip of t frames
    what a budget of 5t ("frame") or 5 ("clip") gives, and 5 of an image; a pruned item loses its newlines."""
    model, proc = tiny(FAMILY, "sdpa")
    inputs = onevision_batch(proc, "mixed")
    spec, options = (COMPOSITION, {}) if method == "composition" else (method, TINY_OPTIONS.get(method, {}))
    with (
        torch.no_grad(),
        tokprune.apply(model, spec, budget=5, video_budget=video_budget, **options) as pruner,
    ):
        model(**inputs)
    frames = _item_frames(model, inputs)
    items = [
        (row, count, content, t)
        for (row, count, content), t in zip(_items(model, inputs), frames, strict=True)
    ]
    n_layers = len(model.model.language_model.layers)
    assert [s.visual_kept for s in pruner.stats.stages] == expected_stage_kept(
        pruner, items, n_layers, video_budget
    )


def test_beam_expansion_keeps_the_tokens_of_the_unexpanded_rows(tiny):
    """generate(num_beams=2) encodes images and videos once and repeats every row: the repeated rows keep
    exactly what the rows keep without beams (ViT signals and layout follow the repetition)."""
    model, proc = tiny(FAMILY, "sdpa")
    inputs = onevision_batch(proc, "mixed")
    with tokprune.apply(model, "fastervlm", keep_ratio=0.25) as pruner, torch.no_grad():
        model(**inputs)
        single = pruner.stats.kept
        model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0)
        beams = pruner.stats.kept
    assert len(beams) == 4
    for row, kept in enumerate(beams):
        assert torch.equal(kept, single[row // 2])


# ------------------------------------------------------------------------------- layout and signals


def _tiles_per_image(model, inputs) -> list[int]:
    cfg = model.config
    return [
        image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for size in inputs["image_sizes"]
    ]


@torch.no_grad()
def test_units_follow_the_packing(tiny):
    """Without downsampling every tile unit holds its tile's projected patches in raster order; with
    downsampling the tile units are rectangles partitioning the grid. Both make a raster tile mosaic."""
    model, proc = tiny(FAMILY, "sdpa")
    inputs = onevision_batch(proc, "mixed")
    packed = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
    ).pooler_output
    layout = adapter_for(model).packing(inputs["image_sizes"], inputs["batch_num_images"])
    assert layout.counts == [int(p.shape[0]) for p in packed]
    newline = model.model.image_newline
    tiles = _tiles_per_image(model, inputs)
    for image, (features, n_tiles) in enumerate(zip(packed, tiles)):
        units, separators = layout.units[image], layout.separators[image]
        assert torch.equal(separators, (features == newline).all(-1))
        content = torch.cat([u.index for u in units]).sort().values
        assert torch.equal(content, (~separators).nonzero().squeeze(1))
        pixels = inputs["pixel_values"][image, :n_tiles]
        tower = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        projected = model.model.multi_modal_projector(tower)  # (tiles, 49, D)
        torch.testing.assert_close(features[units[0].index], projected[0])  # the base view
        downsampled = sum(u.index.numel() for u in units[1:]) < (n_tiles - 1) * 49
        if not downsampled:  # a 2x2-tile 112x112 image: nothing unpadded, nothing interpolated
            for tile, unit in enumerate(units[1:], start=1):
                assert unit.grid == (7, 7)
                torch.testing.assert_close(features[unit.index], projected[tile])
        view = ImageTokens(embeds=features[content], grid=None, units=units)
        mosaic = anyres_mosaic(view, "test")  # a raster mosaic of rectangles (indices are content ranks)
        n_rows = int(separators.sum())  # one newline per row of the packed tile grid
        assert mosaic.size == (n_rows, int((~separators).sum() - units[0].index.numel()) // n_rows)
    assert [u.grid for u in layout.units[1][1:]] == [(5, 6), (5, 5), (5, 6), (6, 6), (6, 5), (6, 6)]


def _eager_received(model, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """(inputs, 49): head- and query-mean attention each patch receives, from eager attention maps."""
    return model.model.vision_tower(pixels, output_attentions=True).attentions[layer].mean(dim=(1, 2))


@torch.no_grad()
def test_signals_follow_the_packing_and_the_sequence(tiny):
    """cls_attention (= attention received: SigLIP has no [CLS]) from eager maps, put through the model's
    own pack_image_features / apply_pooling, placed at the positions of every image and video token."""
    model, proc = tiny(FAMILY, "eager")
    inputs = onevision_batch(proc, "mixed")
    layer = len(clip_encoder_layers(model.model.vision_tower)) - 1  # vision_feature_layer = -1
    tiles = _tiles_per_image(model, inputs)
    pixels = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], tiles)])
    per_tile = _eager_received(model, pixels, layer)[..., None]  # (inputs, 49, 1)
    packed, _ = model.model.pack_image_features(
        list(torch.split(per_tile, tiles)), inputs["image_sizes"], image_newline=torch.zeros(1),
        vision_aspect_ratio=model.config.vision_aspect_ratio,
    )  # fmt: skip
    videos = inputs["pixel_values_videos"]
    per_frame = _eager_received(model, videos.flatten(0, 1), layer)[..., None]
    pooled = model.model.apply_pooling(per_frame).reshape(videos.shape[0], -1)
    pooled = torch.cat([pooled, torch.zeros(videos.shape[0], 1)], 1)  # the clip's newline
    expected = torch.zeros(int(_visual(model, inputs["input_ids"]).sum()))
    flat = inputs["input_ids"][_visual(model, inputs["input_ids"])]
    expected[flat == model.config.image_token_id] = torch.cat(packed)[:, 0]
    expected[flat == model.config.video_token_id] = pooled.reshape(-1)

    store = VisionSignalStore()
    handles = adapter_for(model).install_vision_hooks({"cls_attention", "received_attention"}, store)
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(store.values["cls_attention"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(store.values["received_attention"], expected, atol=1e-6, rtol=0)


def test_interleaved_items_and_default_strategy_are_refused(tiny):
    model, proc = tiny(FAMILY, "sdpa")
    inputs = onevision_batch(proc, "mixed")
    ids = inputs["input_ids"].clone()
    video = model.config.video_token_id
    first_video = int((ids[0] == video).nonzero()[0])
    ids[0, first_video + 3] = model.config.image_token_id  # an image token inside the first clip
    image = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    ids[0, int(image[-1])] = video
    with pytest.raises(UnsupportedInputError, match="interleaved"):
        adapter_for(model).image_layout({**inputs, "input_ids": ids})
    model.config.vision_feature_select_strategy = "default"
    try:
        with pytest.raises(UnsupportedModelError, match="no \\[CLS\\]"):
            LlavaOnevisionAdapter(model)
    finally:
        model.config.vision_feature_select_strategy = "full"
