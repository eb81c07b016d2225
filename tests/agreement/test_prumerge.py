"""PruMerge and PruMerge+ against the authors' code (tests/agreement/ref_prumerge.py): the adaptive count, the
kept patches and their order, the supplemented features and the extra token after the projector."""

from __future__ import annotations

import pytest

from agreement.harness import agreement_llava, jaccard, llava_case, relative_error, run_tokprune
from agreement.ref_prumerge import prumerge_llava

REPRODUCE = dict(order="selection", positions="contiguous")


@pytest.fixture(scope="module")
def llava():
    return agreement_llava()


def emitted(run, image: int = 0) -> tuple[list[int], list[int]]:
    """(tokprune's kept patches in LLM order without the extra token, the slots carrying extra tokens)."""
    extra = run.stats.stages[0].extra[0].tolist()
    return [int(p) for p in run.order[image] if int(p) not in extra], extra


@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_default_equals_the_code(llava, method, seed):
    case = llava_case(seed=seed, model_and_processor=llava)
    kept, features = prumerge_llava(case.vision, 0, plus=method == "prumerge_plus")
    expected = case.model.model.multi_modal_projector(features)
    run = run_tokprune(case, method, **REPRODUCE)  # the default budget: adaptive, as the code
    got, extra = emitted(run)
    assert got == kept
    assert len(extra) == 1 and int(run.order[0][-1]) == extra[0]  # the extra token comes last
    assert relative_error(run.lm_visual[0], expected) < 1e-4
    default = run_tokprune(case, method)  # original order and positions: the same tokens and vectors
    assert jaccard(emitted(default)[0], kept) == 1.0


def test_adaptive_count_differs_per_image(llava):
    """The code's count follows each image's attention; a fixed budget would not."""
    counts = set()
    for seed in range(4):
        case = llava_case(seed=seed, model_and_processor=llava)
        kept, _ = prumerge_llava(case.vision, 0, plus=False)
        run = run_tokprune(case, "prumerge")
        assert run.stats.visual_kept[0] == len(kept) + 1
        counts.add(len(kept))
    assert len(counts) > 1, counts
