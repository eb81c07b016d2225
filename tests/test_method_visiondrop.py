"""VisionDrop: the stage schedule and contextual splits, dominant + contextual merging (the code's "add" and
the "mean" option) and the emitted order, the visual-to-visual attention signal against eager maps, scoring
that ignores the text, the engine's stages and merged states, option errors. The agreement with the
authors' code is tests/agreement/test_visiondrop.py."""

from __future__ import annotations

import math

import pytest
import torch
from checks import assert_valid_keep
from tiny_models import batch_inputs, image_counts, prompt_text, rand_image

import tokprune
from tokprune.core.budget import Budget
from tokprune.errors import MethodOptionError
from tokprune.methods import make_method
from tokprune.methods.base import ImageTokens, ScaledBudget
from tokprune.methods.visiondrop import (
    SIGNAL,
    VisionDrop,
    VisionDropLLM,
    VisionDropVision,
    contextual_count,
    scaled_layers,
    stage_budgets,
)
from tokprune.signals.llm import visual_received_scores

TOL = 1e-5

# ---------------------------------------------------------------------------------------------- schedule


def test_published_schedule_is_reproduced():
    counts = [b.kept(576) for b in stage_budgets(VisionDrop.default_budget)]
    assert counts == [48, 35, 26, 19]
    splits = [(k - contextual_count(k, w, None), contextual_count(k, w, None)) for k, w in
              zip(counts, ("pre", "llm", "llm", "llm"))]  # fmt: skip
    assert splits == [(42, 6), (30, 5), (22, 4), (16, 3)]
    assert scaled_layers(32) == [8, 16, 24] and scaled_layers(4) == [1, 2, 3]


@pytest.mark.parametrize(
    "budget", [Budget(ratio=0.25), Budget(ratio=0.03), Budget(tokens=64), Budget(ratio=1.0)]
)
@pytest.mark.parametrize("n", [1, 49, 576, 2880])
def test_stages_scale_the_final_count_and_never_grow(budget, n):
    counts = [b.kept(n) for b in stage_budgets(budget)]
    final = budget.kept(n)
    assert counts[-1] == final
    expected = [min(n, math.ceil(final * c / 19 - 1e-9)) for c in (48, 35, 26)] + [final]
    assert counts == expected
    assert counts == sorted(counts, reverse=True)
    assert VisionDropLLM().stage_counts(n, budget) == counts[1:]
    assert VisionDrop().part_budgets(budget)[0].kept(n) == counts[0]
    assert VisionDrop().part_budgets(budget)[1] == budget


def test_scaled_budget_takes_keywords_only():
    assert ScaledBudget(final=Budget(tokens=10), factor=2.5).kept(100) == 25
    assert ScaledBudget(final=Budget(tokens=10), factor=2.5).kept(12) == 12
    with pytest.raises(TypeError, match="keywords"):
        ScaledBudget(Budget(tokens=10), 2.5)


# ----------------------------------------------------------------------------------- selection by hand


def _image(scores: torch.Tensor, metric: torch.Tensor, embeds: torch.Tensor, stage: str) -> ImageTokens:
    names = {"pre": ("cls_attention", "vit_keys"), "llm": (SIGNAL, "keys_mean")}[stage]
    return ImageTokens(embeds=embeds, grid=None, signals=dict(zip(names, (scores, metric))))


@pytest.mark.parametrize("merge", ["add", "mean"])
@pytest.mark.parametrize("stage", ["pre", "llm"])
def test_dominant_and_contextual_by_hand(stage, merge):
    # 8 tokens; scores pick 2 and 5 as dominant; with k = 4 and contextual_ratio 0.5: 2 contextual tokens.
    # The 6 remaining tokens 0, 1, 3, 4, 6, 7 -> targets at step 6 // 2 = 3: tokens 0 and 4. The metric puts
    # 1 and 3 with 0 (direction x), 6 and 7 with 4 (direction y).
    scores = torch.tensor([0.1, 0.0, 0.9, 0.2, 0.1, 0.8, 0.0, 0.1])
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    metric = torch.stack([x, x + 0.1 * y, y, x, y, x, y, y + 0.2 * x])
    embeds = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    if stage == "pre":
        method = VisionDropVision(contextual_ratio=0.5, merge=merge)
    else:
        method = VisionDropLLM(contextual_ratio=0.5, merge=merge)
    selection = method.select(_image(scores, metric, embeds, stage), 4)
    assert selection.keep.tolist() == [0, 2, 4, 5]
    if merge == "add":  # the code: the target plus the mean of what it absorbed
        first, second = embeds[0] + embeds[[1, 3]].mean(0), embeds[4] + embeds[[6, 7]].mean(0)
    else:
        first, second = embeds[[0, 1, 3]].mean(0), embeds[[4, 6, 7]].mean(0)
    torch.testing.assert_close(selection.merged, torch.stack([first, embeds[2], second, embeds[5]]))
    # emitted as the code hands them on: dominant tokens (2, 5), then the contextual ones (0, 4)
    assert selection.keep[selection.order].tolist() == [2, 5, 0, 4]


@pytest.mark.parametrize("n,k", [(10, 1), (10, 9), (49, 13), (576, 19)])
def test_select_exactly_k(n, k):
    g = torch.Generator().manual_seed(n)
    image = _image(
        torch.rand(n, generator=g), torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g), "llm"
    )
    selection = VisionDropLLM().select(image, k)
    assert_valid_keep(selection.keep, n, k)
    dominant = k - contextual_count(k, "llm", None)
    top = torch.sort(image.signals[SIGNAL], descending=True, stable=True).indices[:dominant]
    assert set(top.tolist()) <= set(selection.keep.tolist())  # the dominant tokens stay, unmerged
    if dominant == k:  # no contextual token: pure pruning
        assert selection.merged is None
        return
    assert selection.merged.shape == (k, 4)
    for i in top.tolist():
        position = selection.keep.tolist().index(i)
        assert torch.equal(selection.merged[position], image.embeds[i])


# ------------------------------------------------------------------------------------------ the signal


def test_visual_received_scores_match_eager_maps(tiny):
    """Rows with two images, one image, none; left padding: the mean over each image's queries of the
    eager head-mean map, at its own image's keys."""
    model, proc = tiny("llava", "eager")
    batch = proc.tokenizer(
        ["w1 w2 w3 w4 w5 w6 w7 w8 describe", "w1 w2 w3 w4 w5 describe the image please", "w1 w2"],
        return_tensors="pt", padding=True,
    )  # fmt: skip
    valid = batch["attention_mask"].bool()
    length = valid.shape[1]
    image_id = torch.full((3, length), -1)
    image_id[0, length - 8 : length - 5] = 0  # row 0: images 0 and 1 (3 and 2 tokens)
    image_id[0, length - 4 : length - 2] = 1
    image_id[1, length - 8 : length - 4] = 2  # row 1: image 2; row 2: text only
    lm = model.model.language_model
    captured = {}
    layer = 2
    handle = lm.layers[layer].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True
    )
    try:
        with torch.no_grad():
            eager = lm(**batch, output_attentions=True).attentions[layer].mean(1)  # (B, L, L)
    finally:
        handle.remove()
    with torch.no_grad():
        got = visual_received_scores(
            lm.layers[layer].self_attn, captured["hidden_states"], captured["position_embeddings"], image_id,
            valid, chunk=2,
        )  # fmt: skip
    expected = torch.zeros(3, length)
    for row in range(3):
        for image in image_id[row].unique().tolist():
            if image < 0:
                continue
            members = (image_id[row] == image).nonzero().squeeze(1)
            expected[row, members] = eager[row][members][:, members].mean(0)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def _one_image_inputs(proc, words: str) -> dict:
    return dict(
        proc(text=[prompt_text("llava", 1, words)], images=[rand_image(112, 112, 0)], return_tensors="pt")
    )


def test_scoring_ignores_the_text(tiny):
    """Two prompts that differ only in the instruction after the image keep the same tokens at every stage
    (the scores are visual-to-visual attention rows, which causal layers compute before the text)."""
    model, proc = tiny("llava", "sdpa")
    kept = []
    for words in ("describe the image please", "w1 w2 w3 w4 w5 w6 w7"):
        with tokprune.apply(model, "visiondrop", keep_ratio=0.25) as pruner, torch.no_grad():
            model(**_one_image_inputs(proc, words))
            kept.append([s.kept[0].tolist() for s in pruner.stats.stages])
    assert kept[0] == kept[1]
    assert [len(k) for k in kept[0]] == [math.ceil(13 * c / 19 - 1e-9) for c in (48, 35, 26)] + [13]


# ---------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_engine_stages_and_exact_counts(tiny, family):
    model, proc = tiny(family, "sdpa")
    inputs = batch_inputs(family, proc, (1, 2))
    _, content = image_counts(family, model, inputs)
    # Qwen's merger gives no features before the projector: the pre-LLM stage merges the LLM input there
    options = {} if family == "llava" else {"merge_space": "llm", "cls_token": False}
    with tokprune.apply(model, "visiondrop", budget=6, **options) as pruner, torch.no_grad():
        model(**inputs)
        stats = pruner.stats
    assert [s.where for s in stats.stages] == ["pre", "llm@1", "llm@2", "llm@3"]
    assert all(s.method == "visiondrop" for s in stats.stages)
    per_image = [[b.kept(n) for b in stage_budgets(Budget(tokens=6))] for n in content]  # 16/12/9/6
    for s, stage in enumerate(stats.stages):
        assert [int(k.numel()) for k in stage.kept] == [per_image[0][s], per_image[1][s] + per_image[2][s]]


def test_engine_writes_the_merged_states(tiny, monkeypatch):
    """At an in-LLM boundary the method merges the stream entering it, and the kept tokens carry the merged
    states into the next layer."""
    model, proc = tiny("llava", "sdpa")
    inputs = _one_image_inputs(proc, "describe the image please")
    lm = model.model.language_model
    calls = []
    original = VisionDropLLM.select

    def record(self, image, k):
        selection = original(self, image, k)
        calls.append((image, selection))
        return selection

    monkeypatch.setattr(VisionDropLLM, "select", record)
    with tokprune.apply(model, "visiondrop", keep_ratio=0.25) as pruner:
        seen = {}

        def before(module, args, output) -> None:
            seen.setdefault("before", output[0] if isinstance(output, tuple) else output)

        def after(module, args, kwargs) -> None:
            seen.setdefault("after", args[0] if args else kwargs["hidden_states"])

        handles = [
            lm.layers[0].register_forward_hook(before),
            lm.layers[1].register_forward_pre_hook(after, with_kwargs=True),
        ]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        stats = pruner.stats
    image, selection = calls[0]  # boundary 1, the first in-LLM stage
    k = selection.keep.numel()
    assert contextual_count(k, "llm", None) > 0  # something was merged
    ids, image_token = inputs["input_ids"][0], model.config.image_token_id
    visual = (ids == image_token).nonzero().squeeze(1)

    def visual_slots(kept: torch.Tensor) -> torch.Tensor:
        """Slots of the kept visual tokens in the compacted sequence (text + kept visual, in order)."""
        present = torch.ones(ids.shape[0], dtype=torch.bool)
        present[visual] = False
        present[visual[kept]] = True
        return (ids[present] == image_token).nonzero().squeeze(1)

    # the method saw the stream leaving layer 0 (the tokens the pre-LLM stage kept) ...
    torch.testing.assert_close(seen["before"][0][visual_slots(stats.stages[0].kept[0])], image.embeds)
    # ... and layer 1 receives its merged states at the kept tokens
    torch.testing.assert_close(seen["after"][0][visual_slots(stats.stages[1].kept[0])], selection.merged)
    assert not torch.allclose(selection.merged, image.embeds[selection.keep])


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "options",
    [
        {"layers": (8, 16)},
        {"layers": (8, 16, 24.0)},
        {"layers": 8},
        {"contextual_ratio": 1.0},
        {"contextual_ratio": -0.1},
        {"contextual_ratio": True},
        {"merge": "sum"},
        {"merge_space": "clip"},
        {"cls_token": 1},
        {"merge_space": "llm"},  # the [CLS] token needs the features before the projector
    ],
)
def test_option_errors(options):
    with pytest.raises(MethodOptionError, match="visiondrop"):
        make_method("visiondrop", options)


def test_defaults_follow_the_code_and_the_earlier_reading_is_an_option():
    method = make_method("visiondrop", {})
    vision, llm = method.parts()
    assert (vision.merge, vision.merge_space, vision.cls_token, llm.merge) == ("add", "vision", True, "add")
    assert vision.features == "vision" and "vit_cls" in vision.signals
    earlier = make_method("visiondrop", {"merge": "mean", "merge_space": "llm", "cls_token": False})
    vision, llm = earlier.parts()
    assert vision.features == "llm" and "vit_cls" not in vision.signals and llm.merge == "mean"


def test_errors_reach_the_caller(tiny):
    model, _ = tiny("llava", "sdpa")
    with pytest.raises(MethodOptionError, match="strictly increasing"):
        tokprune.apply(model, "visiondrop", layers=(8, 16, 24))  # a 4-layer LLM
    with pytest.raises(MethodOptionError, match="at most one pre-LLM method"):
        tokprune.apply(model, ["visionzip", "visiondrop"])  # visiondrop brings its own pre-LLM stage
    with pytest.raises(MethodOptionError, match="one after the other"):
        tokprune.apply(model, ["visiondrop", ("fastv", {"layer": 2})])  # fastv would prune before layer 3
    assert not hasattr(model, "_tokprune_pruner")
