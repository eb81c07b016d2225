"""SparseVLM against its authors' v1.5 code (tests/agreement/ref_sparsevlm.py) on LLaVA-1.5 shapes (576 tokens).

The tiny LLM has 4 layers: the code's scoring layers 2, 6, 15 (of 32) become 0, 1, 2 (tokprune's default
scaling, round(l * 4 / 32) made strictly increasing), so layers 1, 2, 3 see the three stages' tokens. The
budgets 110 / 36 / 17 are the last top-k counts of the code's "192" / "128" / "64".

The code appends each stage's cluster tokens after the kept visual tokens and renumbers the sequence; the
engine keeps tokens in their slots and positions (a cluster token in its centre's slot). So the first
stage is compared with the code itself; the later stages and the logits with the code run in tokprune's
layout (`layout="slots"`), and the code's own layout there is an expected failure until the engine applies
a selection's order and contiguous positions inside the LLM."""

from __future__ import annotations

import pytest
import torch

from agreement.harness import agreement_llava, jaccard, llava_case, relative_error, run_tokprune
from agreement.llm_steps import plain_inputs, stepwise_logits
from agreement.ref_sparsevlm import SCHEDULES, sparsevlm_step
from tokprune.methods.sparsevlm import SparseVLM

SCORING_LAYERS = (0, 1, 2)
LONG_PROMPT = (
    "USER: <image> describe the image please and say which objects w1 w2 w3 are in it, where they stand, "
    "what colour w4 w5 they have and what w6 happens ASSISTANT:"
)


@pytest.fixture(scope="module")
def llava():
    return agreement_llava()


@pytest.fixture
def recorded(monkeypatch):
    """tokprune's selections, stage by stage."""
    selections = []
    original = SparseVLM.select

    def select(self, image, k):
        selection = original(self, image, k)
        selections.append(selection)
        return selection

    monkeypatch.setattr(SparseVLM, "select", select)
    return selections


def image_span(case) -> tuple[int, int]:
    visual = case.visual[0].nonzero().squeeze(1)
    return int(visual[0]), visual.numel()


def reference(case, budget: int, layout: str, recycle: bool = True):
    """(per stage: top, centres, merged, kept; logits (1, L', V)) of the code on `case`."""
    start, n = image_span(case)
    found: dict = {}
    step = sparsevlm_step(case.lm_input, start, n, SCHEDULES[budget], SCORING_LAYERS, found, layout, recycle)
    logits, _ = stepwise_logits(case.model, *plain_inputs(case), step)
    return found["stages"], logits


def tokprune_stages(run, selections, reordered: bool = False) -> list[dict]:
    """The recorded selections as patch indices: per stage top, centres (cluster order), merged, kept
    (sorted). reordered: the run laid every stage's tokens out in emission order (`order="selection"`), so
    the next stage's view holds them in that order."""
    present = torch.arange(run.stats.visual_in[0])
    stages = []
    for stage, selection in zip(run.stats.stages, selections):
        extra = (
            selection.extra if selection.extra is not None else torch.zeros_like(selection.keep, dtype=bool)
        )
        k = int((~extra).sum())
        emitted = selection.keep[selection.order] if selection.order is not None else selection.keep
        merged = selection.merged[selection.order] if selection.merged is not None else None
        kept = present[selection.keep].sort().values
        assert torch.equal(kept, stage.kept[0])
        stages.append(
            {
                "top": present[selection.keep[~extra]].sort().values,
                "centres": present[emitted[k:]],
                "merged": merged[k:] if merged is not None else torch.zeros(0),
                "kept": kept,
            }
        )
        present = present[emitted] if reordered else kept
    return stages


def assert_stage_equal(got: dict, expected: dict) -> float:
    """Kept tokens and cluster centres exact; returns the merged states' relative difference."""
    assert got["top"].tolist() == expected["top"].tolist()
    assert got["centres"].tolist() == expected["centres"].tolist()
    assert got["kept"].tolist() == expected["kept"].tolist()
    if expected["merged"].numel() == 0:
        assert got["merged"].numel() == 0
        return 0.0
    return relative_error(got["merged"], expected["merged"])


CASES = [(seed, budget) for seed in (0, 1, 2) for budget in (192, 128, 64)]


@pytest.mark.parametrize("seed,budget", CASES)
def test_stages_and_logits_equal_the_code(llava, recorded, seed, budget):
    """Every stage (kept tokens, cluster centres, merged states) and the logits against the code run in
    tokprune's layout; the first stage and every count against the code's own layout."""
    case = llava_case(seed=seed, model_and_processor=llava)
    in_slots, logits = reference(case, budget, "slots")
    in_code, _ = reference(case, budget, "code")
    run = run_tokprune(case, "sparsevlm", budget=SCHEDULES[budget][-1])
    got = tokprune_stages(run, recorded)
    assert len(got) == len(in_slots) == 3
    for g, e in zip(got, in_slots):
        assert assert_stage_equal(g, e) < 1e-4
    assert relative_error(run.logits, logits) < 1e-5
    assert assert_stage_equal(got[0], in_code[0]) < 1e-4
    counts = [s.visual_kept[0] for s in run.stats.stages]
    assert counts == [e["kept"].numel() for e in in_slots] == [e["kept"].numel() for e in in_code]


def test_the_counts_are_the_codes():
    """300 + 9 -> 200 + 4 -> 110 + 3 for "192"; 303 + 9 -> 110 + 7 -> 36 + 3; 66 + 16 -> 30 + 2 -> 17 + 1."""
    from tokprune.core.budget import Budget

    method = SparseVLM()
    assert method.stage_counts(576, Budget(tokens=110)) == [309, 204, 113]
    assert method.stage_counts(576, Budget(tokens=36)) == [312, 117, 39]
    assert method.stage_counts(576, Budget(tokens=17)) == [82, 32, 18]


def test_long_instruction(llava, recorded):
    """A longer instruction (more raters to choose from)."""
    case = llava_case(seed=3, model_and_processor=llava, prompt=LONG_PROMPT)
    expected, logits = reference(case, 192, "slots")
    run = run_tokprune(case, "sparsevlm", budget=110)
    for g, e in zip(tokprune_stages(run, recorded), expected):
        assert assert_stage_equal(g, e) < 1e-4
    assert relative_error(run.logits, logits) < 1e-5


@pytest.mark.parametrize("seed", [0, 4])
def test_without_recycling(llava, recorded, seed):
    """recycle="off" against the code with its recycling taken out (tokprune's layout: original positions)."""
    case = llava_case(seed=seed, model_and_processor=llava)
    expected, logits = reference(case, 128, "slots", recycle=False)
    run = run_tokprune(case, "sparsevlm", budget=36, recycle="off")
    for g, e in zip(tokprune_stages(run, recorded), expected):
        assert assert_stage_equal(g, e) == 0.0
    assert relative_error(run.logits, logits) < 1e-5


def test_the_paper_rater_rule_and_the_earlier_recycling_differ(llava, recorded):
    """recycle="within" (clusters inside the count, Eq. 8-9 as written) keeps other tokens than the code."""
    case = llava_case(seed=0, model_and_processor=llava)
    expected, _ = reference(case, 192, "slots")
    run = run_tokprune(case, "sparsevlm", budget=110, recycle="within")
    got = tokprune_stages(run, recorded)
    assert got[0]["kept"].numel() == 300 != expected[0]["kept"].numel()
    assert jaccard(got[0]["kept"], expected[0]["kept"]) < 0.99


@pytest.mark.parametrize("seed", [0, 1])
def test_later_stages_equal_the_code_in_its_layout(llava, recorded, seed):
    """The reproduction mode lays the clusters out after the kept tokens and renumbers after every stage,
    as the code does: every stage and the logits after the image agree."""
    case = llava_case(seed=seed, model_and_processor=llava)
    expected, logits = reference(case, 192, "code")
    run = run_tokprune(case, "sparsevlm", budget=110, order="selection", positions="contiguous")
    got = tokprune_stages(run, recorded, reordered=True)
    overlap = [jaccard(g["kept"], e["kept"]) for g, e in zip(got, expected)]
    assert min(overlap) == 1.0
    assert max(assert_stage_equal(g, e) for g, e in zip(got, expected)) < 1e-4
    text = case.visual.shape[1] - int(case.visual[0].nonzero().max()) - 1  # tokens after the image
    assert relative_error(run.logits[:, -text:], logits[:, -text:]) < 1e-5
