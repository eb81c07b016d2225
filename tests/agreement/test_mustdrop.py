"""MustDrop against its authors' code (tests/agreement/ref_mustdrop.py), LLaVA-1.5 shapes, the tiny 4-layer LLM
(of the code's filter layers 2, 6, 10, 14 only layer 2 exists: tokprune's default boundary 3).

On these images no 3 x 3 window reaches the code's 0.8 after CLIP's first layer, so the code's vision stage
merges nothing, as tokprune's default vision stage (which keeps every token). The code's filter is driven by
thresholds, tokprune's by the budget: where both thresholds admit the same number r of tokens the code's
kept set is tokprune's at that count (`matched_thresholds`), exactly; the released thresholds admit different
numbers on the two attentions, and there the sets differ (`MustDrop`, difference 2)."""

from __future__ import annotations

import pytest

from agreement.harness import agreement_llava, jaccard, llava_case, relative_error, run_tokprune
from agreement.llm_steps import plain_inputs, stepwise_logits
from agreement.ref_mustdrop import RELEASED, key_set, matched_thresholds, merges_nothing, mustdrop_step


@pytest.fixture(scope="module")
def llava():
    return agreement_llava()


def reference(case, thresholds, renumber: bool = True, key_layer: int = -1):
    """(the code's kept image tokens, sorted patch indices; its prefill logits)."""
    assert merges_nothing(case.vision)  # the code's vision stage is a no-op on this image
    visual = case.visual[0].nonzero().squeeze(1)
    start, n = int(visual[0]), visual.numel()
    found: dict = {}
    step = mustdrop_step(start, n, key_set(case.vision), thresholds, found, renumber)
    logits, _ = stepwise_logits(case.model, *plain_inputs(case), step)
    return found["kept"][-1], logits


def matched(r: int):
    return lambda global_, individual: matched_thresholds(global_, individual, r)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("r", [40, 100])
def test_kept_tokens_and_logits_equal_the_code_at_matched_thresholds(llava, seed, r):
    case = llava_case(seed=seed, model_and_processor=llava)
    expected, logits = reference(case, matched(r), renumber=False)  # positions kept: difference 4
    run = run_tokprune(case, "mustdrop", budget=len(expected))
    assert run.stats.stages[0].visual_kept == [576]  # the vision stage keeps every token
    assert run.kept[0].tolist() == expected
    assert relative_error(run.logits, logits) < 1e-5


@pytest.mark.parametrize("setting", sorted(RELEASED))
def test_released_thresholds_at_their_counts(llava, setting):
    """At the count the released thresholds give, tokprune's exact-count order keeps most of the same
    tokens (Jaccard 0.84-0.98 on these images), not all: the thresholds admit unequal numbers."""
    case = llava_case(seed=0, model_and_processor=llava)
    expected, _ = reference(case, RELEASED[setting], renumber=False)
    run = run_tokprune(case, "mustdrop", budget=len(expected))
    assert run.kept[0].numel() == len(expected)
    assert jaccard(run.kept[0], expected) > 0.8


def test_keys_come_from_the_last_vit_layer(llava):
    """key_layer="feature" (the layer feeding the projector, tokprune's earlier reading) is another key set
    and, at a count where the keys matter, another kept set."""
    case = llava_case(seed=1, model_and_processor=llava)
    expected, _ = reference(case, matched(10), renumber=False)
    assert run_tokprune(case, "mustdrop", budget=len(expected)).kept[0].tolist() == expected
    other = run_tokprune(case, "mustdrop", budget=len(expected), key_layer="feature")
    assert other.kept[0].tolist() != expected


def test_logits_with_the_codes_renumbering(llava):
    case = llava_case(seed=0, model_and_processor=llava)
    expected, logits = reference(case, matched(40))
    run = run_tokprune(case, "mustdrop", budget=len(expected), order="selection", positions="contiguous")
    assert run.kept[0].tolist() == expected
    assert relative_error(run.logits, logits) < 1e-5
