"""Gemma 3 with pan-and-scan: the processor gives a wide or tall image its original view plus crops, each a
full image of `mm_tokens_per_image` tokens to the model, and drops `num_crops` from the model's inputs.

What the model receives cannot tell the views of one image from adjacent images (the prompt separates them
the same way: `<end_of_image>` `\\n\\n` ... `\\n\\n` `<start_of_image>`), so every view is one budget unit:
`budget=k` keeps k tokens of every view, i.e. k x (1 + crops) of an image with crops (README, Gemma 3).
The batch: row 0 one wide image (original + 3 crops), row 1 a square image (no crops) then a tall image
with crops; left padding. Views are counted from the prompt's `<start_of_image>` tokens, not by tokprune.
"""

from __future__ import annotations

import pytest
import torch
from test_invariants import _prefill, assert_matches_reference, run_pruned
from tiny_gemma3 import PAN_AND_SCAN, TOKENS_PER_IMAGE, tiny_gemma3
from tiny_models import rand_image

import tokprune

TEXTS = [
    "USER: <start_of_image> describe the image please ASSISTANT:",
    "USER: <start_of_image> <start_of_image> w1 w2 ASSISTANT:",
]
SIZES = [[(96, 300)], [(96, 96), (200, 96)]]  # (height, width) of every image, per row


@pytest.fixture(scope="module")
def gemma3():
    return tiny_gemma3("sdpa")


def pan_and_scan_batch(proc) -> dict:
    images = [
        [rand_image(h, w, 10 * row + i) for i, (h, w) in enumerate(sizes)] for row, sizes in enumerate(SIZES)
    ]
    return dict(proc(text=TEXTS, images=images, return_tensors="pt", padding=True, **PAN_AND_SCAN))


def views_per_row(model, inputs) -> list[int]:
    """Views (original images and crops) of every row: one `<start_of_image>` each in the expanded prompt."""
    return (inputs["input_ids"] == model.config.boi_token_id).sum(1).tolist()


def test_the_processor_makes_crops(gemma3):
    model, proc = gemma3
    inputs = pan_and_scan_batch(proc)
    views = views_per_row(model, inputs)
    assert views[0] > 1 and views[1] > 2  # the wide and the tall image got crops
    assert inputs["pixel_values"].shape[0] == sum(views)
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert image_tokens == [v * TOKENS_PER_IMAGE for v in views]
    assert not inputs["attention_mask"].bool().all(1).all()  # a left-padded row


@pytest.mark.parametrize("method", ["random", "fastervlm", "pool", "fastv", "mustdrop"])
@pytest.mark.parametrize(("budget", "keep_ratio", "per_view"), [(5, None, 5), (None, 0.25, 9)])
def test_every_view_is_a_budget_unit(gemma3, method, budget, keep_ratio, per_view):
    """budget=5 keeps 5 tokens of every view (original or crop); keep_ratio=0.25 ceil(0.25 * 36) = 9."""
    model, proc = gemma3
    inputs = pan_and_scan_batch(proc)
    views = views_per_row(model, inputs)
    with tokprune.apply(model, method, budget=budget, keep_ratio=keep_ratio) as pruner, torch.no_grad():
        model(**inputs)
    stats = pruner.stats
    assert stats.visual_in == [v * TOKENS_PER_IMAGE for v in views]
    assert stats.visual_kept == [v * per_view for v in views]
    for row, kept in enumerate(stats.kept):
        per = torch.bincount(kept // TOKENS_PER_IMAGE, minlength=views[row])
        assert per.tolist() == [per_view] * views[row]


@pytest.mark.parametrize("method", ["fastervlm", "fastv"])
def test_pan_and_scan_equals_masked_reference(gemma3, method):
    """Prefill and every decode step of a pruned pan-and-scan batch equal the masked reference (every view
    its own bidirectional image block); remove() restores."""
    model, proc = gemma3
    inputs = pan_and_scan_batch(proc)
    unpatched = _prefill(model, inputs)
    pruner = tokprune.apply(model, method, budget=5)
    prefill, generated = run_pruned(model, inputs, pruner)
    assert prefill[1].visual_kept == [5 * v for v in views_per_row(model, inputs)]
    assert_matches_reference(model, inputs, prefill, generated)
    assert torch.equal(_prefill(model, inputs), unpatched)
