"""DivPrune with default options against the authors' selection (`ref_divprune`) on the tiny LLaVA-1.5
(576 tokens): the greedy max-min diverse subset of the LLM input embeddings."""

from __future__ import annotations

import pytest

from agreement import ref_divprune
from agreement.harness import cached_case, jaccard, run_tokprune

SEEDS = (0, 1, 2)


def _case(seed: int):
    return cached_case("llava", seed)


def _embeds(case):
    return case.lm_input[0][case.visual[0]]


@pytest.mark.parametrize("seed", SEEDS)
def test_default_budget_and_kept_set_equal_the_authors_code(seed):
    """No budget given: the code's SUBSET_RATIO 0.098, int(round(0.098 * 576)) = 56 tokens."""
    case = _case(seed)
    k = ref_divprune.count(0.098, 576)
    assert k == 56
    run = run_tokprune(case, "divprune")
    assert run.kept[0].numel() == k
    assert jaccard(run.kept[0], ref_divprune.select(_embeds(case), k)) == 1.0


@pytest.mark.parametrize("budget", [16, 64, 144])
@pytest.mark.parametrize("seed", SEEDS)
def test_kept_set_equals_the_authors_selection(seed, budget):
    case = _case(seed)
    run = run_tokprune(case, "divprune", budget=budget)
    assert jaccard(run.kept[0], ref_divprune.select(_embeds(case), budget)) == 1.0
