"""MustDrop: 3x3 windows, local spatial merging of exactly the similar neighbours, [CLS]-protected key tokens,
the dual-attention order, the stage counts, the keys across both stages in the engine, option errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from checks import assert_valid_keep
from tiny_models import batch_inputs, image_counts

import tokprune
from tokprune.core.budget import Budget
from tokprune.core.layout import Unit
from tokprune.errors import MethodOptionError
from tokprune.methods import make_method
from tokprune.methods.base import ImageTokens
from tokprune.methods.mustdrop import (
    TEXT_SIGNAL,
    MustDrop,
    MustDropPrefill,
    MustDropVision,
    dual_attention_order,
    key_signal,
    local_merge_groups,
    windows,
)

KEY = key_signal(-1)  # the default key ranking: [CLS] attention of the ViT's last layer (the code's)

# --------------------------------------------------------------------------------------------- windows


def test_windows_tile_the_grid_in_raster_order():
    assert [w.tolist() for w in windows((6, 6), 3)][:2] == [
        [0, 1, 2, 6, 7, 8, 12, 13, 14],
        [3, 4, 5, 9, 10, 11, 15, 16, 17],
    ]
    sizes = [w.numel() for w in windows((7, 7), 3)]  # edge windows are smaller
    assert sizes == [9, 9, 3, 9, 9, 3, 3, 3, 1]
    assert sorted(torch.cat(windows((7, 5), 3)).tolist()) == list(range(35))


def _grid_embeds() -> torch.Tensor:
    """A 6 x 6 grid of 4-d embeddings: window 0 (top left) is 9 copies of one vector, window 1 (top right)
    9 close vectors, windows 2 and 3 alternate between orthogonal directions (dissimilar)."""
    embeds = torch.zeros(36, 4)
    w0, w1, w2, w3 = windows((6, 6), 3)
    embeds[w0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    embeds[w1] = torch.tensor([0.0, 1.0, 0.0, 0.0]) + 0.05 * torch.arange(9.0)[:, None] * torch.tensor(
        [0, 0, 1.0, 0]
    )
    for w in (w2, w3):
        for j, token in enumerate(w.tolist()):
            embeds[token, j % 4] = 1.0 + j
    return embeds


def test_only_similar_windows_merge_most_similar_first():
    embeds = _grid_embeds()
    w0, w1, _, _ = windows((6, 6), 3)
    none = torch.zeros(36, dtype=torch.bool)
    groups = local_merge_groups(embeds, (6, 6), none, reduce=100)
    assert [g.tolist() for g in groups] == [w0.tolist(), w1.tolist()]  # windows 2, 3 are below 0.8
    groups = local_merge_groups(embeds, (6, 6), none, reduce=8)  # one window's worth: the identical one
    assert [g.tolist() for g in groups] == [w0.tolist()]
    assert local_merge_groups(embeds, (6, 6), none, reduce=100, threshold=1.01) == []


def test_a_partial_window_merges_its_most_typical_tokens():
    embeds = _grid_embeds()
    w1 = windows((6, 6), 3)[1]
    protected = torch.zeros(36, dtype=torch.bool)
    protected[windows((6, 6), 3)[0]] = True  # window 0 is all keys: nothing to merge there
    groups = local_merge_groups(embeds, (6, 6), protected, reduce=2)
    # the 3 tokens of window 1 closest to the others: its middle ones (offsets 3, 4, 5 along the spread)
    assert [g.tolist() for g in groups] == [w1[[3, 4, 5]].tolist()]


def _vision_image(embeds: torch.Tensor, cls: torch.Tensor, grid=(6, 6)) -> ImageTokens:
    return ImageTokens(embeds=embeds, grid=grid, signals={KEY: cls})


def test_vision_stage_merges_similar_neighbours_and_protects_keys():
    embeds = _grid_embeds()
    w0, w1, w2, w3 = windows((6, 6), 3)
    cls = torch.full((36,), 0.0625)  # exact in binary: merged means tie exactly
    cls[w0[4]] = 0.5  # the only key (ceil(0.02 * 36) = 1): the centre of the identical window
    cls[w2] = torch.linspace(0.07, 0.1, 9)
    method = MustDropVision(key_ratio=0.02)
    k = 36 - 7 - 8 - 2  # window 0 loses 7 (8 mergeable tokens -> 1), window 1 loses 8, 2 more dropped
    selection = method.select(_vision_image(embeds, cls), k)
    assert_valid_keep(selection.keep, 36, k)
    kept = selection.keep.tolist()
    assert int(w0[4]) in kept  # the key stays, with its own state
    assert torch.equal(selection.merged[kept.index(int(w0[4]))], embeds[w0[4]])
    rest0 = w0[torch.arange(9) != 4]
    assert int(rest0[-1]) in kept and not set(rest0[:-1].tolist()) & set(kept)  # merged into its last cell
    torch.testing.assert_close(selection.merged[kept.index(int(rest0[-1]))], embeds[rest0].mean(0))
    assert int(w1[-1]) in kept and not set(w1[:-1].tolist()) & set(kept)
    torch.testing.assert_close(selection.merged[kept.index(int(w1[-1]))], embeds[w1].mean(0))
    # the remaining 2 tokens go by [CLS] attention: the lowest two of window 3 (ties: the later dropped)
    assert set(range(36)) - set(kept) - set(rest0[:-1].tolist()) - set(w1[:-1].tolist()) == {
        int(w3[-2]),
        int(w3[-1]),
    }
    assert set(w2.tolist()) <= set(kept)  # dissimilar windows stay unmerged
    for token in w2.tolist():
        assert torch.equal(selection.merged[kept.index(token)], embeds[token])


@pytest.mark.parametrize("n_side,k", [(6, 1), (6, 35), (7, 13), (24, 192), (24, 64)])
def test_vision_stage_keeps_exactly_k(n_side, k):
    n = n_side * n_side
    g = torch.Generator().manual_seed(k)
    base = torch.randn(n, 8, generator=g)
    embeds = base.repeat_interleave(1, 0) + 0.01 * torch.randn(n, 8, generator=g)
    embeds[: n // 2] = base[0]  # half the grid is one flat region: many similar windows
    cls = torch.rand(n, generator=g)
    selection = MustDropVision().select(_vision_image(embeds, cls, (n_side, n_side)), k)
    assert_valid_keep(selection.keep, n, k)
    keys = torch.sort(cls, descending=True, stable=True).indices[: min(k, math.ceil(0.08 * n))]
    assert set(keys.tolist()) <= set(selection.keep.tolist())


# ------------------------------------------------------------------------------------------ prefill


def test_dual_attention_order_by_hand():
    # 5 visual tokens x 3 instruction tokens. Global (row sums): 0.6, 0.5, 0.1, 0.45, 0.3; individual (row
    # maxima): 0.2, 0.5, 0.1, 0.15, 0.3. Token 1 is first by individual attention, token 0 by global.
    attention = torch.tensor(
        [
            [0.2, 0.2, 0.2],
            [0.5, 0.0, 0.0],
            [0.1, 0.0, 0.0],
            [0.15, 0.15, 0.15],
            [0.0, 0.0, 0.3],
        ]
    )
    # global ranks 0:0 1:1 3:2 4:3 2:4; individual ranks 1:0 4:1 0:2 3:3 2:4; best: 0:0 1:0 4:1 3:2 2:4
    assert dual_attention_order(attention).tolist() == [0, 1, 4, 3, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_attention_prefixes_are_the_released_filters_union(seed):
    """The released filter keeps a token when either attention clears its threshold. With both thresholds
    admitting r tokens each, the kept set is the union of the top r by global (sum) and by individual (max)
    attention; every such union is a prefix of the order."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.rand(30, 4, generator=g) ** 3
    order = dual_attention_order(attention).tolist()
    by_global = torch.sort(attention.sum(1), descending=True, stable=True).indices.tolist()
    by_individual = torch.sort(attention.amax(1), descending=True, stable=True).indices.tolist()
    for r in range(1, 31):
        union = set(by_global[:r]) | set(by_individual[:r])
        assert set(order[: len(union)]) == union


def _prefill_image(attention: torch.Tensor, cls: torch.Tensor, m: int, full_n: int) -> ImageTokens:
    return ImageTokens(
        embeds=torch.zeros(attention.shape[0], 2), grid=None,
        signals={TEXT_SIGNAL: attention, KEY: cls}, text={TEXT_SIGNAL: torch.zeros(m, 1)},
        full_n=full_n,
    )  # fmt: skip


def test_prefill_keeps_the_keys_then_dual_attention():
    attention = torch.tensor(
        [
            [0.2, 0.2, 0.2, 9.0],  # column 3 pads a row with fewer instruction tokens
            [0.5, 0.0, 0.0, 9.0],
            [0.1, 0.0, 0.0, 0.0],
            [0.15, 0.15, 0.15, 0.0],
            [0.0, 0.0, 0.3, 0.0],
        ]
    )
    cls = torch.tensor([0.0, 0.1, 0.9, 0.0, 0.2])
    # full image of 20 tokens, key_ratio 0.1 -> 2 keys: tokens 2 and 4 (the top [CLS] attention)
    method = MustDropPrefill(key_ratio=0.1)
    assert method.select(_prefill_image(attention, cls, 3, 20), 3).keep.tolist() == [0, 2, 4]
    assert method.select(_prefill_image(attention, cls, 3, 20), 4).keep.tolist() == [0, 1, 2, 4]
    assert method.select(_prefill_image(attention, cls, 3, 20), 1).keep.tolist() == [2]  # keys capped at k
    # with 0 instruction tokens, column 0 (the row's last token) is the only query
    assert method.select(_prefill_image(attention, cls, 0, 10), 2).keep.tolist() == [1, 2]


# --------------------------------------------------------------------------------------- stage counts


@pytest.mark.parametrize(
    "budget", [Budget(ratio=1 / 3), Budget(ratio=0.05), Budget(tokens=64), Budget(ratio=1.0)]
)
@pytest.mark.parametrize("n", [49, 576])
def test_stage_counts(budget, n):
    vision, final = MustDrop().part_budgets(budget)
    assert final == budget
    assert vision.kept(n) == n  # by default the vision stage keeps every token (the code drops none there)
    assert MustDrop(vision_factor=2).part_budgets(budget)[0].kept(n) == min(n, 2 * budget.kept(n))
    assert MustDropPrefill().stage_counts(n, budget) == [budget.kept(n)]
    assert MustDrop(vision_factor=1.5).part_budgets(budget)[0].kept(n) == min(
        n, math.ceil(1.5 * budget.kept(n) - 1e-9)
    )


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_engine_counts_and_keys_survive_both_stages(tiny, monkeypatch, family):
    """Exact counts per stage; the prefill stage sees, through the engine, the same [CLS] attention for its
    tokens as the vision stage, and every key token of the vision stage is in the final set."""
    model, proc = tiny(family, "sdpa")
    inputs = batch_inputs(family, proc, (1, 2))
    _, content = image_counts(family, model, inputs)
    seen = {"vision": [], "prefill": []}
    for cls_, key in ((MustDropVision, "vision"), (MustDropPrefill, "prefill")):
        original = cls_.select

        def record(self, image, k, original=original, key=key):
            seen[key].append(image.signals[KEY].clone())
            return original(self, image, k)

        monkeypatch.setattr(cls_, "select", record)
    with tokprune.apply(model, "mustdrop", keep_ratio=0.25, vision_factor=2) as pruner, torch.no_grad():
        model(**inputs)
        stats = pruner.stats
    assert [(s.method, s.where) for s in stats.stages] == [("mustdrop", "pre"), ("mustdrop", "llm@3")]
    final = [math.ceil(0.25 * n - 1e-9) for n in content]
    vision = [min(n, 2 * f) for n, f in zip(content, final)]
    for stage, per_image in zip(stats.stages, (vision, final)):
        assert [int(k.numel()) for k in stage.kept] == [per_image[0], per_image[1] + per_image[2]]
    # image by image (row 0: image 0; row 1: images 1, 2): visual ranks of each image within its row
    starts = [0, 0, content[1]]
    rows = [0, 1, 1]
    for image, (row, start, n) in enumerate(zip(rows, starts, content)):
        cls = seen["vision"][image]
        keys = torch.sort(cls, descending=True, stable=True).indices[: math.ceil(0.08 * n)]
        kept_vision = stats.stages[0].kept[row]
        local = kept_vision[(kept_vision >= start) & (kept_vision < start + n)] - start
        torch.testing.assert_close(seen["prefill"][image], cls[local])  # aligned ViT signal in the LLM
        final_local = stats.stages[1].kept[row] - start
        assert set(keys.tolist()) <= set(final_local.tolist())


def _record_stages(monkeypatch) -> dict:
    """Patch both stages to record, per image, what they saw and chose (image-local indices)."""
    seen = {"vision": [], "prefill": []}
    for cls_, key in ((MustDropVision, "vision"), (MustDropPrefill, "prefill")):
        original = cls_.select

        def record(self, image, k, original=original, key=key):
            selection = original(self, image, k)
            cls = image.signals[KEY].float().reshape(-1)
            units = len(image.units or ())
            seen[key].append(
                dict(cls=cls.clone(), k=k, full_n=image.full_n, units=units, keep=selection.keep)
            )
            return selection

        monkeypatch.setattr(cls_, "select", record)
    return seen


def _assert_one_key_set(seen: dict, key_ratio: float = 0.08) -> int:
    """Every image pruned by both stages: the vision stage kept the rule's key set (the top ceil(key_ratio *
    full_n) by [CLS] attention over the whole image), and the final set holds all of it, or its top f when
    the final count f is smaller. Returns the number of images checked."""
    assert len(seen["vision"]) == len(seen["prefill"])
    for vision, prefill in zip(seen["vision"], seen["prefill"]):
        n_keys = math.ceil(key_ratio * vision["full_n"] - 1e-9)
        ranked = torch.sort(vision["cls"], descending=True, stable=True).indices
        keys = ranked[: min(vision["k"], n_keys)].tolist()
        assert set(keys) <= set(vision["keep"].tolist())
        final = vision["keep"][prefill["keep"]]  # the prefill view holds the vision stage's kept tokens
        assert prefill["full_n"] == vision["full_n"]
        assert set(keys[: prefill["k"]]) <= set(final.tolist())
    return len(seen["vision"])


ANYRES_SIZES = [((112, 112), (112, 168)), ((168, 112), (112, 112)), ((224, 224), (112, 112))]


@pytest.mark.parametrize("sizes", ANYRES_SIZES)
@pytest.mark.parametrize("ratio", [0.25, 0.1])
def test_keys_survive_both_stages_on_anyres_images(tiny, monkeypatch, sizes, ratio):
    """LLaVA-NeXT: base view + tiles. The key set is chosen once over the whole image (not per tile), so the
    prefill stage never drops a key the vision stage protected (per-tile keys lost 1-3 keys here)."""
    model, proc = tiny("llava_next", "sdpa")
    seen = _record_stages(monkeypatch)
    inputs = batch_inputs("llava_next", proc, (1, 2), sizes=sizes)
    with tokprune.apply(model, "mustdrop", keep_ratio=ratio, vision_factor=2), torch.no_grad():
        model(**inputs)
    assert _assert_one_key_set(seen) == 3
    assert all(v["units"] > 2 for v in seen["vision"])  # a base view and tiles


def test_vision_stage_keys_are_global_on_units():
    """Two units with all the high attention in the first: the keys all come from it (a per-unit rule would
    take ceil(0.08 * 36) = 3 from each), merging stays inside each unit's windows, exactly k kept."""
    units = [Unit(index=torch.arange(36), grid=(6, 6), kind="frame"),
             Unit(index=torch.arange(36, 72), grid=(6, 6), kind="frame")]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(72, 8, generator=g)
    window = (36 + windows((6, 6), 3)[0]).tolist()  # the top-left 3 x 3 window of unit 1
    embeds[window] = embeds[36].clone()  # identical: the one mergeable window
    cls = torch.rand(72, generator=g) * 0.1
    cls[:36] += 1.0
    cls[window] += 0.5  # the merged token outranks the rest of unit 1 in the drop step
    image = ImageTokens(embeds=embeds, grid=None, signals={KEY: cls}, units=units, full_n=72)
    k = 40
    selection = MustDropVision().select(image, k)
    assert_valid_keep(selection.keep, 72, k)
    keys = torch.sort(cls, descending=True, stable=True).indices[: math.ceil(0.08 * 72)]
    assert set(keys.tolist()) <= set(selection.keep.tolist()) and bool((keys < 36).all())
    # the identical window merged into its last member: the mean of the identical vectors is that vector
    kept = selection.keep.tolist()
    assert window[-1] in kept and not set(window[:-1]) & set(kept)
    torch.testing.assert_close(selection.merged[kept.index(window[-1])], embeds[36])


def _video_inputs(proc, frames: int = 4, side: int = 112) -> dict:
    """One Qwen2-VL clip of frames / 2 temporal slices of (side / 28)^2 LLM tokens, laid out as the video
    processor does (see tests/test_video.py, which documents the layout)."""
    ip = proc.image_processor
    p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    rgb = np.random.default_rng(7).integers(0, 255, (frames, side, side, 3), dtype=np.uint8)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (ip.image_mean, ip.image_std))
    video = (torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255 - mean) / std
    t, h, w = frames // tp, side // p, side // p
    patches = video.reshape(t, tp, 3, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pads = "<|video_pad|>" * (t * h * w // (m * m))
    inputs = dict(
        proc.tokenizer(
            [f"USER: <|vision_start|>{pads}<|vision_end|> describe ASSISTANT:"], return_tensors="pt"
        )
    )
    video_id = proc.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    inputs["mm_token_type_ids"] = 2 * (inputs["input_ids"] == video_id).long()
    inputs["pixel_values_videos"] = patches.reshape(t * h * w, 3 * tp * p * p)
    inputs["video_grid_thw"] = torch.tensor([[t, h, w]])
    return inputs


@pytest.mark.parametrize("ratio", [0.25, 0.1])
def test_keys_survive_both_stages_on_video_frames(tiny, monkeypatch, ratio):
    """A Qwen2-VL clip of 2 frames of 4 x 4 tokens: the key set is ceil(0.08 * 32) = 3 over the clip (per
    frame it would be 2 + 2), and the prefill stage keeps it."""
    model, proc = tiny("qwen2_vl", "sdpa")
    seen = _record_stages(monkeypatch)
    with tokprune.apply(model, "mustdrop", keep_ratio=ratio, vision_factor=2) as pruner, torch.no_grad():
        model(**_video_inputs(proc))
    assert _assert_one_key_set(seen) == 1
    assert (seen["vision"][0]["full_n"], seen["vision"][0]["units"]) == (32, 2)
    final = math.ceil(ratio * 32 - 1e-9)
    assert [s.visual_kept for s in pruner.stats.stages] == [[min(32, 2 * final)], [final]]


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "options",
    [
        {"layer": 0},
        {"layer": 2.5},
        {"key_ratio": 1.5},
        {"key_ratio": True},
        {"window": 1},
        {"threshold": 2},
        {"vision_factor": 0.5},
        {"vision_factor": "2"},
        {"key_layer": "last"},
        {"key_layer": 1.5},
    ],
)
def test_option_errors(options):
    with pytest.raises(MethodOptionError, match="mustdrop"):
        make_method("mustdrop", options)


def test_key_layer_selects_the_signal():
    assert MustDrop().signals[0] == "cls_attention@-1"
    assert [part.signals[-1] for part in MustDrop(key_layer="feature").parts()] == ["cls_attention"] * 2
    assert MustDrop(key_layer=-2).parts()[1].signals == (TEXT_SIGNAL, "cls_attention@-2")


def test_default_vision_stage_keeps_every_token(tiny):
    model, proc = tiny("llava", "sdpa")
    inputs = batch_inputs("llava", proc, (1,))
    _, content = image_counts("llava", model, inputs)
    with tokprune.apply(model, "mustdrop", keep_ratio=0.25) as pruner, torch.no_grad():
        model(**inputs)
    assert [s.visual_kept for s in pruner.stats.stages] == [content, [math.ceil(0.25 * content[0] - 1e-9)]]
    assert all(m.numel() == 0 for m in pruner.stats.stages[0].merged)


def test_errors_reach_the_caller(tiny):
    model, _ = tiny("llava", "sdpa")
    with pytest.raises(MethodOptionError, match="layer=4"):
        tokprune.apply(model, "mustdrop", layer=4)  # a 4-layer LLM
    with pytest.raises(MethodOptionError, match="at most one pre-LLM method"):
        tokprune.apply(model, ["visionzip", "mustdrop"])
    with pytest.raises(TypeError, match="parts"):
        MustDrop().select(ImageTokens(embeds=torch.zeros(4, 2), grid=None), 2)
    assert not hasattr(model, "_tokprune_pruner")
