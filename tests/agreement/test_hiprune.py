"""HiPrune with default options against the authors' selection (`ref_hiprune`) on tiny LLaVA-1.5 and
LLaVA-NeXT models at the real token grids."""

from __future__ import annotations

import pytest
import torch

from agreement import ref_hiprune
from agreement.harness import (
    cached_case,
    jaccard,
    run_tokprune,
)
from tokprune.methods.hiprune import HiPrune

SEEDS = (0, 1, 2)
_case = cached_case


def _object_layer(case) -> int:
    """The adapter's "@object" layer for the tower's depth (HiPrune's 9 of 24, generalised)."""
    depth = case.model.config.vision_config.num_hidden_layers
    return max(0, round(depth * 3 / 8) - 1)


@pytest.mark.parametrize("budget", [64, 128, 192])
@pytest.mark.parametrize("seed", SEEDS)
def test_llava_kept_set_equals_the_authors_selection(seed, budget):
    case = _case("llava", seed)
    expected = ref_hiprune.select(case.vision.attentions, budget, _object_layer(case))[0]
    run = run_tokprune(case, "hiprune", budget=budget)
    assert jaccard(run.kept[0], expected) == 1.0
    assert run.kept[0].tolist() == expected.tolist()


@pytest.mark.parametrize("seed", SEEDS)
def test_llava_border_anchors_wrap_as_in_the_code(seed):
    """alpha = 1 gives many anchors, so some sit on a row end or the border; the code's clamped flat
    neighbours must be followed (the 2-D variant "grid" keeps a different set)."""
    case = _case("llava", seed)
    expected = ref_hiprune.select(case.vision.attentions, 128, _object_layer(case), alpha=1.0)[0]
    assert run_tokprune(case, HiPrune(alpha=1.0), budget=128).kept[0].tolist() == expected.tolist()


@pytest.mark.parametrize("seed", SEEDS)
def test_llava_next_kept_set_equals_the_authors_selection(seed):
    """Base view + 2 x 2 tiles, nothing unpadded: each view keeps int(320 / 5) = 64 patches."""
    case = _case("next", seed)
    views = ref_hiprune.select(case.vision.attentions, 320, _object_layer(case))
    assert len(views) == 5
    expected = ref_hiprune.next_placeholders(views, case.grid, (2, 2))
    run = run_tokprune(case, "hiprune", budget=320)
    assert jaccard(run.kept[0], expected) == 1.0


def test_grid_variant_differs_where_anchors_touch_a_border():
    """The named option "grid" is tokprune's 2-D rule: on a case with a border anchor its kept set is not
    the code's (so the test above can tell them apart)."""
    differs = []
    for seed in SEEDS:
        case = _case("llava", seed)
        expected = ref_hiprune.select(case.vision.attentions, 128, _object_layer(case), alpha=1.0)[0]
        grid = run_tokprune(case, HiPrune(alpha=1.0, neighbours="grid"), budget=128).kept[0]
        differs.append(grid.tolist() != expected.tolist())
    assert any(differs)


def test_reference_wraps_row_ends_and_clamps():
    """The reference's flat rule on a hand-made 4 x 4 view: anchor 3 (end of row 0) brings 2, 7 and 4
    (the next row's first token) and 0 (its clamped upper neighbour)."""
    obj = torch.zeros(16)
    obj[3] = 1.0
    deep = torch.arange(16.0)
    kept = ref_hiprune.select_view(obj, deep, 4, count=6, alpha=1.0)  # round(6 / 5) = 1 anchor
    assert kept.tolist() == [0, 2, 3, 4, 7, 15]  # + 1 register: 15, the top deep score
