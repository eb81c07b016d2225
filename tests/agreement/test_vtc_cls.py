"""VTC-CLS with default options against the authors' selection (`ref_vtc_cls`) on the tiny LLaVA-1.5
(576 tokens, a 6-layer CLIP tower)."""

from __future__ import annotations

import pytest

from agreement import ref_vtc_cls
from agreement.harness import cached_case, jaccard, run_tokprune
from tokprune.methods.vtc_cls import VTCCLS

SEEDS = (0, 1, 2)


def _case(seed: int):
    return cached_case("llava", seed)


def _depth(case) -> int:
    return case.model.config.vision_config.num_hidden_layers


@pytest.mark.parametrize("seed", SEEDS)
def test_default_equals_the_code_from_the_fourth_last_layer(seed):
    """Defaults start_layer=-4, end_layer=-2, budget 64 = the code's `--layer depth - 4`, token_num 64
    (layers 20..22 of CLIP-L's 24; here 2..4 of 6)."""
    case = _case(seed)
    expected = ref_vtc_cls.select(case.vision.attentions, 64, _depth(case) - 4)
    assert run_tokprune(case, "vtc_cls").kept[0].tolist() == expected.tolist()


@pytest.mark.parametrize("start", [-5, -3, -2])
@pytest.mark.parametrize("budget", [32, 128])
@pytest.mark.parametrize("seed", SEEDS)
def test_other_start_layers_and_budgets(seed, budget, start):
    case = _case(seed)
    expected = ref_vtc_cls.select(case.vision.attentions, budget, _depth(case) + start)
    run = run_tokprune(case, VTCCLS(start_layer=start), budget=budget)
    assert jaccard(run.kept[0], expected) == 1.0
