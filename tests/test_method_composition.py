"""Composition budgets: every method of a composition may carry its own budget / keep_ratio in its pair;
apply()'s budget / keep_ratio set the last method unless its pair does; stats report every stage."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch_inputs, image_counts

import tokprune
from tokprune.core.budget import Budget
from tokprune.core.layout import image_rows
from tokprune.errors import BudgetError, MethodOptionError
from tokprune.methods import make_method, make_stage
from tokprune.methods.attention_llm import PyramidDrop
from tokprune.methods.visionzip import VisionZip

FAMILIES = ["llava", "llava_next", "qwen2_vl", "internvl"]


def _per_row(family: str, model, inputs, per_image: list[int]) -> list[int]:
    """Row sums of per-image counts (images fill the rows in order)."""
    counts, _ = image_counts(family, model, inputs)
    visual = inputs["input_ids"] == model.config.image_token_id
    rows = image_rows(visual, counts)
    return [sum(k for k, r in zip(per_image, rows) if r == row) for row in range(visual.shape[0])]


def _run(model, inputs, method, **budget):
    with tokprune.apply(model, method, **budget) as pruner, torch.no_grad():
        model(**inputs)
    return pruner


@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_keeps_its_own_budget(tiny, family):
    """Pre-LLM stage 10 per image (its pair's budget), then fastv at half of what it receives (its pair's
    keep_ratio), then dart at apply()'s budget, 3: exact counts at every stage."""
    model, proc = tiny(family, "sdpa")
    inputs = batch_inputs(family, proc, (1, 2))
    _, content = image_counts(family, model, inputs)
    assert min(content) > 10  # every image is pruned by the first stage
    method = [
        ("visionzip", {"budget": 10}),
        ("fastv", {"layer": 1, "keep_ratio": 0.5}),
        (
            "dart",
            {"layer": 3, "quota": "exact"},
        ),  # exactly the budget (the code's quota keeps its pivots on top)
    ]
    pruner = _run(model, inputs, method, budget=3)
    assert pruner.budgets == [Budget(tokens=10), Budget(ratio=0.5), Budget(tokens=3)]
    stages = pruner.stats.stages
    assert [(s.method, s.where) for s in stages] == [
        ("visionzip", "pre"),
        ("fastv", "llm@1"),
        ("dart", "llm@3"),
    ]
    for stage, per_image in zip(stages, (10, 5, 3)):
        assert stage.visual_kept == _per_row(family, model, inputs, [per_image] * len(content))
    assert pruner.stats.visual_kept == stages[-1].visual_kept


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_visionzip_to_a_budget_then_pyramiddrop(tiny, family):
    """ "VisionZip to 10, then PyramidDrop to a quarter of that": PyramidDrop's stages count on the 10."""
    model, proc = tiny(family, "sdpa")
    inputs = batch_inputs(family, proc, (1, 2))
    _, content = image_counts(family, model, inputs)
    pruner = _run(model, inputs, [("visionzip", {"budget": 10}), "pdrop"], keep_ratio=0.25)
    pdrop = PyramidDrop().stage_counts(10, Budget(ratio=0.25))
    assert pdrop[-1] == 3 and len(pdrop) == 3
    stages = pruner.stats.stages
    assert [s.method for s in stages] == ["visionzip", "pdrop", "pdrop", "pdrop"]
    for stage, per_image in zip(stages, [10, *pdrop]):
        assert stage.visual_kept == _per_row(family, model, inputs, [per_image] * len(content))


def test_earlier_methods_keep_their_defaults_without_a_pair_budget(tiny):
    model, proc = tiny("llava", "sdpa")
    inputs = batch_inputs("llava", proc, (1,))  # one 7 x 7 image
    pruner = _run(model, inputs, ["fastervlm", ("fastv", {"layer": 2})], budget=4)
    assert pruner.budgets == [Budget(ratio=0.25), Budget(tokens=4)]  # fastervlm's published default
    assert [s.visual_kept for s in pruner.stats.stages] == [[13], [4]]


def test_method_objects_take_a_budget_in_a_pair(tiny):
    model, proc = tiny("llava", "sdpa")
    inputs = batch_inputs("llava", proc, (1,))
    method = [
        (VisionZip(contextual_ratio=0.5), {"budget": 12}),
        (make_method("fastv", {"layer": 2}), {"budget": 5}),
    ]
    pruner = _run(model, inputs, method)
    assert [s.visual_kept for s in pruner.stats.stages] == [[12], [5]]
    assert pruner.methods[0].contextual_ratio == 0.5


def test_a_single_pair_is_a_single_method(tiny):
    model, proc = tiny("llava", "sdpa")
    pruner = _run(model, batch_inputs("llava", proc, (1,)), ("fastervlm", {"budget": 7}))
    assert pruner.stats.visual_kept == [7]


def test_a_composite_method_in_a_pair(tiny):
    """mustdrop (vision stage at twice the final count, prefill stage) to 6, then dart to apply()'s 2, counted
    on the 6."""
    model, proc = tiny("llava", "sdpa")
    method = [("mustdrop", {"layer": 1, "budget": 6, "vision_factor": 2}), ("dart", {"quota": "exact"})]
    pruner = _run(model, batch_inputs("llava", proc, (1,)), method, budget=2)
    assert [(s.method, s.visual_kept) for s in pruner.stats.stages] == [
        ("mustdrop", [12]), ("mustdrop", [6]), ("dart", [2])
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "pair, match",
    [
        (("visionzip", {"budget": 10, "keep_ratio": 0.5}), "visionzip: give either budget"),
        (("visionzip", {"budget": 0}), "visionzip: budget must be a positive int"),
        (("visionzip", {"keep_ratio": 1.5}), r"visionzip: keep_ratio must be in \(0, 1\]"),
        (("pdrop", {"ratios": (0.5, 0.5, 0.5), "budget": 10}), "pdrop: its stage options fix the kept count"),
    ],
)
def test_bad_pair_budgets(pair, match):
    with pytest.raises(BudgetError, match=match):
        make_stage(*pair)


def test_errors_reach_the_caller_and_install_nothing(tiny):
    model, _ = tiny("llava", "sdpa")
    with pytest.raises(BudgetError, match="visionzip: give either budget"):
        tokprune.apply(model, [("visionzip", {"budget": 10, "keep_ratio": 0.5}), "fastv"])
    with pytest.raises(BudgetError, match="fastv got a budget twice"):
        tokprune.apply(model, ["visionzip", ("fastv", {"budget": 5})], budget=3)
    with pytest.raises(BudgetError, match="fastv got a budget twice"):
        tokprune.apply(model, ("fastv", {"keep_ratio": 0.5}), keep_ratio=0.25)
    with pytest.raises(MethodOptionError, match="only budget or keep_ratio may go with it"):
        tokprune.apply(model, [(VisionZip(), {"contextual_ratio": 0.5}), "fastv"])
    with pytest.raises(MethodOptionError, match="visionzip has no option"):
        tokprune.apply(model, [("visionzip", {"budget": 10, "ratio": 0.5}), "fastv"])
    assert not hasattr(model, "_tokprune_pruner")


def test_make_method_says_where_a_budget_goes():
    with pytest.raises(MethodOptionError, match=r"not method options; give them to tokprune.apply\(\), or"):
        make_method("visionzip", {"budget": 20})
    method, own = make_stage("fastv", {"layer": 3, "budget": 20})
    assert (method.name, method.layer, own) == ("fastv", 3, Budget(tokens=20))
    method, own = make_stage("visionzip", {})
    assert isinstance(method, VisionZip) and own is None
