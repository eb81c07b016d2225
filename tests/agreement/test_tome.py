"""ToMe (pre-LLM merge to the budget) against ToMe's own matching and size-weighted merge applied in
rounds (`ref_tome`): kept positions and merged LLM input embeddings, on LLaVA-1.5's 576 CLIP patches and
on a SigLIP 27 x 27 grid (729 tokens: odd counts, where ToMe's floor(t / 2) cap matters)."""

from __future__ import annotations

import pytest

from agreement import ref_tome
from agreement.harness import agreement_llava, jaccard, llava_case, relative_error, run_tokprune
from tokprune.methods.tome import ToMe

SEEDS = (0, 1, 2)
TOWERS = {"clip": {}, "siglip": {"tower": "siglip", "grid": 27}}
_MODELS: dict = {}
_CASES: dict = {}


def _case(tower: str, seed: int):
    if tower not in _MODELS:
        _MODELS[tower] = agreement_llava(**TOWERS[tower])
    if (tower, seed) not in _CASES:
        _CASES[tower, seed] = llava_case(seed, model_and_processor=_MODELS[tower])
    return _CASES[tower, seed]


def _inputs(case):
    """(metric (P, d): head-mean keys of the layer feeding the projector at the patch tokens, embeds
    (P, D): the unpruned LLM input at the image's placeholders)."""
    cfg = case.model.config
    depth = cfg.vision_config.num_hidden_layers
    layer = cfg.vision_feature_layer % (depth + 1) - 1  # the layer whose output is the feature layer
    first = 1 if cfg.vision_feature_select_strategy == "default" else 0  # [CLS] dropped
    keys = ref_tome.head_mean_keys(case.vision.keys[layer][0], case.vision.heads)[first:]
    return keys, case.lm_input[0][case.visual[0]]


@pytest.mark.parametrize("round_order", ["raster", "tome"])
@pytest.mark.parametrize("budget", [64, 128, 200])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("seed", SEEDS)
def test_kept_positions_and_merged_embeddings_match_tome(seed, tower, budget, round_order):
    case = _case(tower, seed)
    metric, embeds = _inputs(case)
    assert embeds.shape[0] == (576 if tower == "clip" else 729)
    ids, merged, _ = ref_tome.merge_to(metric, embeds, budget, round_order)
    method = "tome" if round_order == "raster" else ToMe(round_order=round_order)
    run = run_tokprune(case, method, budget=budget)
    assert jaccard(run.kept[0], ids) == 1.0
    by_id = dict(zip(ids.tolist(), merged))
    expected = merged.new_zeros(run.lm_visual[0].shape)
    for row, slot in enumerate(run.order[0].tolist()):
        expected[row] = by_id[slot]
    assert relative_error(run.lm_visual[0], expected) <= 1e-4


def test_round_orders_differ_on_odd_counts():
    """On 729 tokens round one leaves one A token unmerged, so the raster and ToMe orders split the next
    rounds differently: the two references (and so the two tests above) must not coincide."""
    differ = []
    for seed in SEEDS:
        metric, embeds = _inputs(_case("siglip", seed))
        raster = ref_tome.merge_to(metric, embeds, 64, "raster")[0]
        tome = ref_tome.merge_to(metric, embeds, 64, "tome")[0]
        differ.append(jaccard(raster, tome) < 1.0)
    assert all(differ)


def test_full_rounds_make_the_orders_agree():
    """576 -> 64 (288, 144, 72, then 8 merges): no A token stays before the last round, so both orders
    give the same kept set."""
    metric, embeds = _inputs(_case("clip", 0))
    raster = ref_tome.merge_to(metric, embeds, 64, "raster")[0]
    tome = ref_tome.merge_to(metric, embeds, 64, "tome")[0]
    assert jaccard(raster, tome) == 1.0
