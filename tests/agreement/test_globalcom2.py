"""GlobalCom² against its authors' code (tests/agreement/ref_globalcom2.py) on LLaVA-NeXT: the kept tokens of
an image with 2 x 2 full tiles (nothing unpadded) and of images whose tiles unpadding shortens, and the
order the code hands them to the LLM (reproduction mode)."""

from __future__ import annotations

import pytest
import torch
from tokprune.patches import adapter_for
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from agreement.harness import agreement_llava_next, jaccard, llava_next_case, run_tokprune
from agreement.ref_globalcom2 import cls_logits_last_layer, globalcom2_image

REPRODUCE = dict(order="selection", positions="contiguous")
# (size (H, W), seed): square 2x2 tiles, nothing unpadded; 1x2 tiles shortened to 20 of 24 rows; 2x2 tiles
# shortened to 20 rows (a wide image) and to 20 columns (a tall one)
CASES = [((192, 192), 0), ((192, 192), 1), ((80, 192), 0), ((160, 192), 1), ((192, 160), 0)]


@pytest.fixture(scope="module")
def llava_next():
    return agreement_llava_next()


def reference(case) -> tuple[list[int], int]:
    """(the code's kept tokens as LLM placeholder indices of the image, in its emission order; the number
    of content tokens of the image)."""
    cfg = case.model.config
    size = case.inputs["image_sizes"][0]
    grid = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    scores = cls_logits_last_layer(case.vision, case.vision.heads)
    tokens = globalcom2_image(scores, tuple(size.tolist()), grid)
    _, source = adapter_for(case.model).packing(case.inputs["image_sizes"])  # ViT (view * P + patch) per slot
    slot = {int(s): i for i, s in enumerate(source.tolist()) if s >= 0}
    side = scores.shape[1]
    return [slot[view * side + patch] for view, patch in tokens], int((source >= 0).sum())


@pytest.mark.parametrize(("size", "seed"), CASES)
def test_kept_tokens_and_order_follow_the_code(llava_next, size, seed):
    case = llava_next_case(size=size, seed=seed, model_and_processor=llava_next)
    expected, n = reference(case)
    run = run_tokprune(case, "globalcom2", keep_ratio=0.25)
    k = run.kept[0].numel()
    assert k == -(-n // 4)  # ceil(0.25 n) content tokens; the code keeps up to 1 + tiles fewer (floors)
    assert len(expected) <= k <= len(expected) + 5
    assert set(expected) <= set(run.kept[0].tolist())  # every token the code keeps, plus the rounding rest
    score = jaccard(run.kept[0], expected)
    print(f"GlobalCom2 {size} seed {seed}: kept {k}, the code {len(expected)}, Jaccard {score:.4f}")
    assert score >= 0.99
    ordered = run_tokprune(case, "globalcom2", keep_ratio=0.25, **REPRODUCE)
    emitted = [t for t in ordered.order[0].tolist() if t in set(expected)]
    assert emitted == expected  # the code's order, the extra tokens left out


def test_the_cases_discriminate(llava_next):
    """The earlier default (post-softmax attention of the feature layer, temperature 0.1, unpadded areas,
    proportional shares) keeps other tokens than the code; so does the code's logits at the feature layer."""
    case = llava_next_case(size=(192, 192), seed=0, model_and_processor=llava_next)
    expected, _ = reference(case)
    old = dict(score="attention", layer=None, crop_areas="unpadded", allocation="proportional")
    assert jaccard(run_tokprune(case, "globalcom2", keep_ratio=0.25, **old).kept[0], expected) < 0.6
    assert jaccard(run_tokprune(case, "globalcom2", keep_ratio=0.25, layer=None).kept[0], expected) < 0.9


def test_reference_ratios_are_not_uniform(llava_next):
    """Temperature 10 on summed logits leaves the crop ratios uneven on these cases (the allocation is
    exercised, not only the ranking inside crops)."""
    from agreement.ref_globalcom2 import crop_scales

    case = llava_next_case(size=(192, 192), seed=0, model_and_processor=llava_next)
    scales = crop_scales(cls_logits_last_layer(case.vision, case.vision.heads)[0], 2, 2, 0.25)
    assert max(scales) - min(scales) > 0.02, scales
    assert torch.tensor(scales).mean().item() == pytest.approx(0.25, abs=1e-6)
