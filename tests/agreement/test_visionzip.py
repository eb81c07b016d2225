"""VisionZip against its authors' code (tests/agreement/ref_visionzip.py): the kept ViT tokens, the order the
code hands them to the LLM, the merged features after the projector, and, in the reproduction mode, the
whole prefill."""

from __future__ import annotations

import pytest
import torch

from agreement.harness import (
    agreement_llava,
    agreement_llava_next,
    jaccard,
    llava_case,
    llava_next_case,
    relative_error,
    run_tokprune,
)
from agreement.ref_visionzip import split, visionzip_llava, visionzip_pass

REPRODUCE = dict(order="selection", positions="contiguous")


@pytest.fixture(scope="module")
def llava():
    return agreement_llava()


@pytest.fixture(scope="module")
def llava_next():
    return agreement_llava_next()


def vit_ids(run, image: int = 0, ordered: bool = False) -> list[int]:
    """tokprune's kept tokens as ViT token indices ([CLS] = 0 for the slot that carries it, patch p = p + 1),
    in LLM order or sorted."""
    extra = set(run.stats.stages[0].extra[0].tolist())
    tokens = run.order[image] if ordered else run.kept[image]
    offset = image * 0
    return [0 if int(p) + offset in extra else int(p) + 1 for p in tokens]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [64, 128, 192])
def test_llava_kept_tokens_order_and_features_equal_the_code(llava, seed, k):
    case = llava_case(seed=seed, model_and_processor=llava)
    expected_ids, features = visionzip_llava(case.vision, 0, k)
    expected = case.model.model.multi_modal_projector(features)
    run = run_tokprune(case, "visionzip", budget=k, **REPRODUCE)
    assert vit_ids(run, ordered=True) == expected_ids
    assert relative_error(run.lm_visual[0], expected) < 1e-4
    default = run_tokprune(case, "visionzip", budget=k)  # original order and positions: the same tokens
    assert jaccard(vit_ids(default), expected_ids) == 1.0


def test_llava_two_images_each_as_the_code(llava):
    case = llava_case(seed=3, n_images=2, model_and_processor=llava)
    run = run_tokprune(case, "visionzip", budget=64, **REPRODUCE)
    extra = run.stats.stages[0].extra[0]
    per_image = case.vision.features.shape[1]
    for image in range(2):
        expected_ids, features = visionzip_llava(case.vision, image, 64)
        got = [
            0 if int(p) + image * per_image in set(extra.tolist()) else int(p) + 1 for p in run.order[image]
        ]
        assert got == expected_ids
        expected = case.model.model.multi_modal_projector(features)
        assert relative_error(run.lm_visual[image], expected) < 1e-4


@torch.no_grad()
def test_reproduction_mode_equals_the_codes_llava_sequence(llava):
    """The authors' LLaVA pipeline: text, the emitted tokens, text, numbered 0, 1, 2, ... (LLaVA's
    prepare_inputs_labels_for_multimodal), run by the unpatched language model."""
    case = llava_case(seed=4, model_and_processor=llava)
    _, features = visionzip_llava(case.vision, 0, 64)
    visual = case.visual[0]
    first = int(visual.nonzero()[0])
    last = int(visual.nonzero()[-1])
    projected = case.model.model.multi_modal_projector(features)
    embeds = torch.cat([case.lm_input[0, :first], projected, case.lm_input[0, last + 1 :]])[None]
    lm = case.model.model.language_model
    hidden = lm(inputs_embeds=embeds, position_ids=torch.arange(embeds.shape[1])[None]).last_hidden_state
    expected = case.model.lm_head(hidden)
    run = run_tokprune(case, "visionzip", budget=64, **REPRODUCE)
    assert run.logits.shape == expected.shape
    assert relative_error(run.logits, expected) < 1e-4


def _next_reference(case, k_per_tile: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The code's LLaVA-NeXT path for an image whose tiles are all whole (nothing unpadded): per ViT pass
    (base view, then tiles) VisionZip at k_per_tile; emitted as base, tiles' dominant patches in mosaic order,
    tiles' [CLS], tiles' contextual. Returns ([(tile, ViT token)] in that order, (m, C) features)."""
    v = case.vision
    dominant, contextual = split(k_per_tile)
    passes = [
        visionzip_pass(
            v.attentions[-2][t], v.hidden_states[-2][t], v.keys[-2][t], v.heads, dominant, contextual
        )
        for t in range(v.hidden_states[-2].shape[0])
    ]
    order = [(0, i) for i in passes[0][0]]
    rows = [passes[0][1]]
    grid = case.grid
    side = round((len(passes) - 1) ** 0.5)  # square mosaic (2 x 2 for a 192 x 192 image)
    dominant_tiles = []
    for t, (ids, feats) in enumerate(passes[1:], start=1):
        tile_row, tile_col = divmod(t - 1, side)
        for j, token in enumerate(ids[:dominant]):
            if token == 0:
                continue
            r, c = divmod(token - 1, grid)
            dominant_tiles.append(
                ((tile_row * grid + r) * side * grid + tile_col * grid + c, t, token, feats[j])
            )
    dominant_tiles.sort(key=lambda item: item[0])
    order += [(t, token) for _, t, token, _ in dominant_tiles]
    rows.append(torch.stack([f for *_, f in dominant_tiles]))
    order += [(t, 0) for t in range(1, len(passes))]
    rows.append(torch.stack([passes[t][1][0] for t in range(1, len(passes))]))
    for t in range(1, len(passes)):
        order += [(t, token) for token in passes[t][0][dominant:]]
        rows.append(passes[t][1][dominant:])
    return order, torch.cat(rows)


def _next_tokprune_ids(case, run) -> list[tuple[int, int]]:
    """tokprune's LLaVA-NeXT tokens in LLM order as (ViT pass, ViT token) pairs."""
    grid = case.grid
    extra = set(run.stats.stages[0].extra[0].tolist())
    mosaic = 2 * grid  # 2 x 2 tiles of grid x grid, a newline after every mosaic row
    out = []
    for p in run.order[0].tolist():
        if p < grid * grid:
            out.append((0, 0 if p in extra else p + 1))
            continue
        row, col = divmod(p - grid * grid, mosaic + 1)
        tile = 1 + (row // grid) * 2 + col // grid
        if p in extra:
            out.append((tile, 0))
        else:
            out.append((tile, 1 + (row % grid) * grid + col % grid))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_llava_next_square_image_equals_the_code(llava_next, seed):
    case = llava_next_case(size=(192, 192), seed=seed, model_and_processor=llava_next)
    expected_ids, features = _next_reference(case, 64)
    run = run_tokprune(case, "visionzip", budget=5 * 64, **REPRODUCE)
    assert _next_tokprune_ids(case, run) == expected_ids
    expected = case.model.model.multi_modal_projector(features)
    assert relative_error(run.lm_visual[0], expected) < 1e-4
