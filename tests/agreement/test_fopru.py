"""FoPru against the public implementation its docstring cites (tests/agreement/ref_fopru.py): the kept
patches of LLaVA-1.5 images, default options ("rank" on the pre-softmax logit means), and the "row" option
against that implementation's ratio-based row strategy."""

from __future__ import annotations

import math

import pytest
import torch

from agreement.harness import agreement_llava, jaccard, llava_case, relative_error, run_tokprune
from agreement.ref_fopru import fopru_llava, fopru_rows, means, significance


@pytest.fixture(scope="module")
def llava():
    return agreement_llava()


def _layer(case) -> int:
    """The code's scoring layer: encoder layer vision_feature_layer % n_layers (-2: the projected one)."""
    return case.model.config.vision_feature_layer % len(case.vision.queries)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio", [0.25, 0.125, 0.5])
def test_llava_default_keeps_the_codes_tokens(llava, seed, ratio):
    case = llava_case(seed=seed, model_and_processor=llava)
    n = case.vision.features.shape[1]
    run = run_tokprune(case, "fopru", keep_ratio=ratio)
    k = run.kept[0].numel()
    assert k == math.ceil(ratio * n)
    [expected] = fopru_llava(case.vision, _layer(case), k)
    assert run.kept[0].tolist() == expected  # Jaccard 1.0: the same patches


def test_llava_two_images_each_as_the_code(llava):
    case = llava_case(seed=5, n_images=2, model_and_processor=llava)
    run = run_tokprune(case, "fopru", budget=100)
    expected = fopru_llava(case.vision, _layer(case), 100)
    assert [kept.tolist() for kept in run.kept] == expected


def test_the_cases_discriminate(llava):
    """The cases can tell the variants apart: the earlier default (received softmax attention) keeps other
    tokens than the code, and so does each logit mean where the code picks the other one."""
    for seed in range(3):
        case = llava_case(seed=seed, model_and_processor=llava)
        [expected] = fopru_llava(case.vision, _layer(case), 144)
        old = run_tokprune(case, "fopru", keep_ratio=0.25, score="attention")
        assert jaccard(old.kept[0], expected) < 0.9, seed
        q, k = case.vision.queries[_layer(case)][0], case.vision.keys[_layer(case)][0]
        column, row = means(q, k, case.vision.heads)
        other = row if torch.equal(significance(q, k, case.vision.heads), column) else column
        assert jaccard(other.topk(144).indices, expected) < 0.9, seed


@pytest.mark.parametrize("seed", [0, 3])
def test_llava_row_option_keeps_the_codes_rows(llava, seed):
    """strategy="row" at k = whole rows equals the implementation's ratio-based row strategy."""
    case = llava_case(seed=seed, model_and_processor=llava)
    run = run_tokprune(case, "fopru", budget=6 * 24, strategy="row")
    assert run.kept[0].tolist() == fopru_rows(
        case.vision.queries[_layer(case)][0], case.vision.keys[_layer(case)][0], case.vision.heads, 0.25
    )


@torch.no_grad()
def test_reproduction_mode_equals_the_codes_llava_sequence(llava):
    """The implementation's LLaVA pipeline: text, the kept patches' projected features in ascending order,
    text, numbered 0, 1, 2, ... (its prompt holds only as many image tokens as it keeps), run by the
    unpatched language model."""
    case = llava_case(seed=4, model_and_processor=llava)
    [expected_ids] = fopru_llava(case.vision, _layer(case), 144)
    visual = case.visual[0].nonzero().squeeze(1)
    first, last = int(visual[0]), int(visual[-1])
    projected = case.model.model.multi_modal_projector(case.vision.features[0, expected_ids])
    embeds = torch.cat([case.lm_input[0, :first], projected, case.lm_input[0, last + 1 :]])[None]
    lm = case.model.model.language_model
    hidden = lm(inputs_embeds=embeds, position_ids=torch.arange(embeds.shape[1])[None]).last_hidden_state
    expected = case.model.lm_head(hidden)
    run = run_tokprune(case, "fopru", keep_ratio=0.25, order="selection", positions="contiguous")
    assert run.logits.shape == expected.shape
    assert relative_error(run.logits, expected) < 1e-4
