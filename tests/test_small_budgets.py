"""Budgets smaller than the number of AnyRes tiles or crops: every method on every model keeps exactly
min(budget, n) visual tokens per image, or, for an in-LLM method whose authors' code counts otherwise, what
its `stage_counts` says for its final stage (DART's pivots on top of the budget, SparseVLM's recycled
clusters); a unit whose share of the budget is 0 loses all its tokens; indices sorted and in range. Methods
and models join from the registry and BUILDERS."""

import pytest
import torch
from checks import final_count, skip_without_tiles
from test_invariants import TINY_OPTIONS
from test_video import video_batch
from tiny_models import BUILDERS, batch_inputs, image_counts

import tokprune
from tokprune.core.layout import image_rows
from tokprune.methods import REGISTRY


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("method", tokprune.available_methods())
def test_tiny_budgets_keep_exact_counts(tiny, family, method, attn):
    model, proc = tiny(family, attn)
    skip_without_tiles(model, method)
    inputs = batch_inputs(family, proc, (1, 2))
    counts, content = image_counts(family, model, inputs)
    rows = image_rows(inputs["input_ids"] == model.config.image_token_id, counts)
    for budget in (1, 3):
        options = TINY_OPTIONS.get(method, {})
        with tokprune.apply(model, method, budget=budget, **options) as pruner, torch.no_grad():
            logits = model(**inputs).logits
        stats = pruner.stats
        per_image = [final_count(method, options, budget, c) for c in content]
        expected = [sum(k for k, r in zip(per_image, rows) if r == row) for row in range(2)]
        assert stats.visual_kept == expected, (budget, content)
        for row, kept in enumerate(stats.kept):
            assert kept.numel() == expected[row]
            assert bool((kept[1:] > kept[:-1]).all()) and int(kept.min()) >= 0
            assert int(kept.max()) < stats.visual_in[row]
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("video_budget", ["frame", "clip"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("method", [m for m in tokprune.available_methods() if not REGISTRY[m].needs_tiles])
def test_tiny_budgets_on_clips_keep_exact_counts(tiny, family, method, video_budget):
    """A clip is one item: budget 1 or 3 per frame (2 and 3 frames), or per clip, below its number of frames."""
    model, proc = tiny(family, "sdpa")
    inputs, row_counts = video_batch(family, proc, (("video",), ("image", "video")))
    first, second = inputs["video_grid_thw"][:, 0].tolist()
    frames = [[first], [0, second]]  # per row and item: a clip's frames (temporal slices), 0 for the image
    for budget in (1, 3):
        options = TINY_OPTIONS.get(method, {})
        with (
            torch.no_grad(),
            tokprune.apply(model, method, budget=budget, video_budget=video_budget, **options) as pruner,
        ):
            logits = model(**inputs).logits
        expected = [
            sum(
                final_count(method, options, budget * (t if video_budget == "frame" and t else 1), n)
                for n, t in zip(counts, ts)
            )
            for counts, ts in zip(row_counts, frames)
        ]
        assert pruner.stats.visual_kept == expected
        assert torch.isfinite(logits).all()
