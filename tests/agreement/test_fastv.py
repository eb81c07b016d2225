"""FastV against its authors' inplace code (tests/agreement/ref_fastv.py): the kept image tokens and the
prefill logits of the code's layer-by-layer forward (eager, drop before layer K at original positions)
against tokprune (sdpa, the score recomputed from layer K - 1's projections and cache)."""

from __future__ import annotations

import pytest
import torch

from agreement.harness import agreement_llava, jaccard, llava_case, run_tokprune
from agreement.llm_steps import plain_inputs, stepwise_logits
from agreement.ref_fastv import fastv_step, image_spans

TOL = 5e-5  # max |logit difference|: eager step-by-step vs sdpa with a cache (measured <= 1.8e-5)


@pytest.fixture(scope="module")
def llava():
    return agreement_llava()


@pytest.fixture(scope="module")
def llava_siglip():
    return agreement_llava(tower="siglip", grid=27)  # 729 tokens: counts where rounding matters


def code_run(case, layer: int, count: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The code's kept patches per image (placeholder indices) and its prefill logits (1, L', V)."""
    per_image = case.vision.features.shape[1]
    spans = image_spans(case.visual[0], per_image)
    found: dict = {}
    logits, _ = stepwise_logits(case.model, *plain_inputs(case), fastv_step(layer, spans, count, found))
    return [kept - start for kept, (start, _) in zip(found["kept"], spans)], logits


def assert_agrees(run, kept: list[torch.Tensor], logits: torch.Tensor) -> None:
    for image, expected in enumerate(kept):
        assert jaccard(run.kept[image], expected) == 1.0
        assert torch.equal(run.kept[image], expected)
    assert run.logits.shape == logits.shape
    assert (run.logits[0, -1] - logits[0, -1]).abs().max() < TOL  # the next-token logits
    assert (run.logits - logits).abs().max() < TOL  # every real position


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("count", [72, 144, 288, 432])  # the eval script's ranks: R = 87.5/75/50/25 %
def test_kept_tokens_and_logits_equal_the_code(llava, seed, count):
    case = llava_case(seed=seed, model_and_processor=llava)
    kept, logits = code_run(case, 2, count)
    assert_agrees(run_tokprune(case, "fastv", budget=count), kept, logits)


@pytest.mark.parametrize("seed", [3, 4])
def test_default_is_the_papers_k2_r50(llava, seed):
    case = llava_case(seed=seed, model_and_processor=llava)
    kept, logits = code_run(case, 2, 288)
    run = run_tokprune(case, "fastv")
    assert [s.where for s in run.stats.stages] == ["llm@2"]
    assert_agrees(run, kept, logits)


@pytest.mark.parametrize("layer", [1, 3])
def test_other_k_equal_the_code(llava, layer):
    case = llava_case(seed=5, model_and_processor=llava)
    kept, logits = code_run(case, layer, 144)
    assert_agrees(run_tokprune(case, "fastv", budget=144, layer=layer), kept, logits)


def test_two_images_each_ranked_on_its_span(llava):
    case = llava_case(seed=6, n_images=2, model_and_processor=llava)
    kept, logits = code_run(case, 2, 100)
    assert_agrees(run_tokprune(case, "fastv", budget=100), kept, logits)


@pytest.mark.parametrize("seed", [0, 1])
def test_round_gives_the_hf_ports_count(llava_siglip, seed):
    """729 tokens at R = 50 %: the llava-hf port keeps round(364.5) = 364 (tokprune's ceil: 365). Eager
    attention: on this tower's larger embeddings sdpa and eager differ by 1e-3 even unpruned."""
    case = llava_case(seed=seed, model_and_processor=llava_siglip)
    kept, logits = code_run(case, 2, round(729 * (1 - 0.5)))
    run = run_tokprune(case, "fastv", attn="eager", rounding="round")
    assert run.stats.visual_kept == [364]
    assert_agrees(run, kept, logits)
    assert run_tokprune(case, "fastv").stats.visual_kept == [365]
