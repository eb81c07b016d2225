"""HoloV with default options against a reading of the authors' code (`ref_holov`), on tiny LLaVA-1.5 and
LLaVA-NeXT models of the real classes: the kept set, the order the code hands the tokens to the LLM
(reproduction mode), the LLM input at the kept tokens and the logits of that sequence."""

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
from agreement.ref_holov import anyres_sequence, holov_official, llava_inputs, to_placeholders

_MODELS: dict = {}
REPRODUCE = dict(order="selection", positions="contiguous")


def _model(kind: str):
    if kind not in _MODELS:
        _MODELS[kind] = agreement_llava() if kind == "llava" else agreement_llava_next()
    return _MODELS[kind]


def _reference_logits(case, emitted_features: torch.Tensor) -> torch.Tensor:
    """Logits of the code's LLM input: the prompt's text with the image's placeholders replaced by the
    emitted features (in the code's order), positions 0, 1, 2, ... (the code rebuilds the sequence)."""
    model = case.model
    visual = case.visual[0]
    where = visual.nonzero().squeeze(1)
    start, end = int(where[0]), int(where[-1]) + 1
    assert bool(visual[start:end].all()), "one image block per prompt"
    row = case.lm_input[0]
    embeds = torch.cat([row[:start], emitted_features.to(row.dtype), row[end:]])[None]
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        return model.lm_head(hidden)


@pytest.mark.parametrize("budget", [64, 128, 192])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_llava_matches_the_code(seed, budget):
    case = llava_case(seed, model_and_processor=_model("llava"))
    features, attention = llava_inputs(case.vision, case.model.model.multi_modal_projector, 0)
    emitted = holov_official(features, attention, budget)
    assert len(emitted) == budget, "no share exceeds its run on these inputs (the code would pad)"
    run = run_tokprune(case, "holov", budget=budget)
    score = jaccard(run.kept[0], emitted)
    print(f"holov llava seed={seed} budget={budget}: jaccard {score:.4f}")
    assert run.kept[0].tolist() == sorted(emitted)

    run = run_tokprune(case, "holov", budget=budget, **REPRODUCE)
    assert run.order[0].tolist() == emitted, "tokens in the code's order"
    assert relative_error(run.lm_visual[0], features[emitted]) < 1e-5
    expected = _reference_logits(case, features[emitted])
    assert relative_error(run.logits, expected) < 1e-4


def _next_reference(case, budget: int) -> tuple[list[int], torch.Tensor]:
    """(the code's emitted tokens as image-placeholder positions, their features) on a LLaVA-NeXT case."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    model = case.model
    size = tuple(case.inputs["image_sizes"][0].tolist())
    tiles_hw = get_anyres_image_grid_shape(
        size, model.config.image_grid_pinpoints, model.config.vision_config.image_size
    )
    with torch.no_grad():
        features = model.model.multi_modal_projector(case.vision.features)  # (1 + T, 576, D)
    attention = case.vision.attentions[-2][:, :, 0, 1:].mean(1).float()  # (1 + T, 576)
    seq_features, width = anyres_sequence(features, tiles_hw, size)
    seq_attention, _ = anyres_sequence(attention, tiles_hw, size)
    emitted = holov_official(seq_features, seq_attention, budget)
    return to_placeholders(emitted, features.shape[1], width), seq_features[emitted]


@pytest.mark.parametrize("size", [(192, 192), (150, 192), (96, 192)])
def test_llava_next_matches_the_code(size):
    """The code's anyres path: one HoloV call on the base view + unpadded mosaic, 16 runs across both."""
    case = llava_next_case(size, model_and_processor=_model("llava_next"))
    emitted, features = _next_reference(case, 64)
    assert len(emitted) == 64
    run = run_tokprune(case, "holov", budget=64)
    score = jaccard(run.kept[0], emitted)
    print(f"holov llava_next size={size} budget=64: jaccard {score:.4f}")
    assert run.kept[0].tolist() == sorted(emitted)

    run = run_tokprune(case, "holov", budget=64, **REPRODUCE)
    assert run.order[0].tolist() == emitted
    assert relative_error(run.lm_visual[0], features) < 1e-5
    assert relative_error(run.logits, _reference_logits(case, features)) < 1e-4


def test_former_defaults_differ_from_the_code():
    """tokprune's own variant (2-D blocks ranked by score, water filling) is an option, and it is not the
    code: on these inputs its kept set differs from the code's."""
    case = llava_case(0, model_and_processor=_model("llava"))
    features, attention = llava_inputs(case.vision, case.model.model.multi_modal_projector, 0)
    emitted = holov_official(features, attention, 64)
    options = dict(
        layout="blocks", rank_by="score", scoring="centred", allocation="water_fill", units="per_unit"
    )
    run = run_tokprune(case, "holov", budget=64, **options)
    score = jaccard(run.kept[0], emitted)
    print(f"holov llava former defaults: jaccard {score:.4f}")
    assert score < 0.9
