"""FasterVLM with default options against the authors' selection (`ref_fastervlm`) on the tiny
LLaVA-1.5 (576 tokens) and LLaVA-NeXT (base view + 2 x 2 tiles)."""

from __future__ import annotations

import pytest

from agreement import ref_fastervlm
from agreement.harness import (
    cached_case,
    jaccard,
    run_tokprune,
)
from agreement.ref_hiprune import next_placeholders

SEEDS = (0, 1, 2)
_case = cached_case


@pytest.mark.parametrize("seed", SEEDS)
def test_default_keeps_a_quarter_by_cls_attention(seed):
    """No budget: keep_ratio 0.25, 144 of 576 (the README's "576 * (1 - 0.75) = 144")."""
    case = _case("llava", seed)
    expected = ref_fastervlm.select(case.vision.attentions, 144)[0]
    run = run_tokprune(case, "fastervlm")
    assert run.kept[0].tolist() == expected.tolist()


@pytest.mark.parametrize("budget", [29, 58, 192])
@pytest.mark.parametrize("seed", SEEDS)
def test_kept_set_equals_the_authors_selection(seed, budget):
    case = _case("llava", seed)
    expected = ref_fastervlm.select(case.vision.attentions, budget)[0]
    assert jaccard(run_tokprune(case, "fastervlm", budget=budget).kept[0], expected) == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_llava_next_keeps_the_same_count_in_every_crop(seed):
    case = _case("next", seed)
    expected = next_placeholders(ref_fastervlm.select(case.vision.attentions, 32), case.grid, (2, 2))
    assert jaccard(run_tokprune(case, "fastervlm", budget=160).kept[0], expected) == 1.0
