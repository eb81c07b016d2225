"""VisionDrop against its authors' code (tests/agreement/ref_visiondrop.py), LLaVA-1.5 shapes (576 patches),
the published schedule 48 -> 35 -> 26 -> 19 (tokprune's default keep_ratio 19/576) at boundaries 1, 2, 3 of
the tiny 4-layer LLM (8, 16, 24 of 32, scaled).

Agreeing: the pre-LLM step (kept ViT tokens, the order the LLM receives them, the projected features), and in
the reproduction mode (`order="selection", positions="contiguous"`) every in-LLM stage and the logits."""

from __future__ import annotations

import pytest
import torch

from agreement.harness import agreement_llava, jaccard, llava_case, relative_error, run_tokprune
from agreement.llm_steps import stepwise_logits
from agreement.ref_visiondrop import PRE, STAGES, llm_input, visiondrop_pre, visiondrop_step

REPRODUCE = dict(order="selection", positions="contiguous")
BOUNDARIES = (1, 2, 3)


@pytest.fixture(scope="module")
def llava():
    return agreement_llava()


def vit_ids(run, tokens: torch.Tensor) -> list[int]:
    """Patch slots -> ViT token indices ([CLS] = 0 for the slot that carries it), one-image runs."""
    extra = set(run.stats.stages[0].extra[0].tolist())
    return [0 if int(p) in extra else int(p) + 1 for p in tokens]


def reference(case, code: bool = True) -> tuple[list[int], torch.Tensor, list[list[int]], torch.Tensor]:
    """(emitted ViT ids, (48, C) features, per in-LLM stage the kept tokens as indices into the 48 emitted
    ones, the code's logits); code=False: with tokprune's documented in-LLM deviations."""
    emitted, features = visiondrop_pre(case.vision)
    embeds, start = llm_input(case, features)
    positions = torch.arange(embeds.shape[1])[None]
    mask = torch.ones_like(positions)
    found: dict = {}
    step = visiondrop_step(case.model.model.language_model, BOUNDARIES, start, found, code)
    logits, _ = stepwise_logits(case.model, embeds, positions, mask, step)
    stages = [[i - start for i in stage] for stage in found["stages"]]
    return emitted, features, stages, logits


def emitted_rank(run) -> dict[int, int]:
    """Patch slot -> its index among the tokens the LLM received (the reference's emitted order)."""
    return {int(p): j for j, p in enumerate(run.order[0])}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pre_llm_step_and_first_stage_equal_the_code(llava, seed):
    case = llava_case(seed=seed, model_and_processor=llava)
    emitted, features, stages, _ = reference(case)
    run = run_tokprune(case, "visiondrop", **REPRODUCE)
    assert [s.visual_kept[0] for s in run.stats.stages] == [sum(PRE)] + [sum(s) for s in STAGES]
    assert vit_ids(run, run.order[0]) == emitted  # [CLS], dominant patches, contextual targets
    expected = case.model.model.multi_modal_projector(features)
    assert relative_error(run.lm_visual[0], expected) < 1e-4
    rank = emitted_rank(run)
    first = sorted(rank[int(p)] for p in run.stats.stages[1].kept[0])
    assert first == sorted(stages[0])


def test_default_mode_keeps_the_codes_tokens_before_the_llm(llava):
    case = llava_case(seed=3, model_and_processor=llava)
    emitted, _, _, _ = reference(case)
    run = run_tokprune(case, "visiondrop")
    assert jaccard(vit_ids(run, run.stats.stages[0].kept[0]), emitted) == 1.0


def test_the_earlier_reading_differs(llava):
    """merge="mean" on the LLM input without [CLS] (tokprune's earlier version) is another pre-LLM step."""
    case = llava_case(seed=0, model_and_processor=llava)
    emitted, _, _, _ = reference(case)
    run = run_tokprune(case, "visiondrop", merge="mean", merge_space="llm", cls_token=False)
    assert jaccard(vit_ids(run, run.stats.stages[0].kept[0]), emitted) < 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whole_prefill_equals_the_code(llava, seed):
    """The reproduction mode: every in-LLM stage laid out (dominant, then contextual) and renumbered as the
    code does, head-mean keys: every stage's kept tokens and the logits equal the code's."""
    case = llava_case(seed=seed, model_and_processor=llava)
    _, _, stages, logits = reference(case)
    run = run_tokprune(case, "visiondrop", **REPRODUCE)
    rank = emitted_rank(run)
    for s, stage in enumerate(stages, start=1):
        assert sorted(rank[int(p)] for p in run.stats.stages[s].kept[0]) == sorted(stage)
    assert run.logits.shape == logits.shape
    assert relative_error(run.logits, logits) < 1e-5
