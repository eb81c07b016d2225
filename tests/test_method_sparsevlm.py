"""SparseVLM: raters and scores on hand-made attention, the text-query signal and the rater score against eager
attention maps, the stage schedule, token recycling against its definition, option errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from checks import assert_valid_keep
from tiny_models import batch_inputs

import tokprune
from tokprune.core.budget import Budget
from tokprune.core.compat import output_cache
from tokprune.errors import MethodOptionError
from tokprune.methods import make_method
from tokprune.methods.base import ImageTokens
from tokprune.methods.sparsevlm import (
    SIGNAL,
    SparseVLM,
    density_peak_clusters,
    rater_scores,
    recycle_into_kept,
)
from tokprune.signals.llm import cached_keys, text_query_scores

TOL = 1e-5


def _image(attention: torch.Tensor, m: int | None = None, embeds: torch.Tensor | None = None) -> ImageTokens:
    """An image whose signal is `attention` (n, T), with m instruction tokens (text rows) of the row."""
    n, width = attention.shape
    m = width if m is None else m
    embeds = torch.randn(n, 4, generator=torch.Generator().manual_seed(0)) if embeds is None else embeds
    return ImageTokens(
        embeds=embeds, grid=None, signals={SIGNAL: attention}, text={SIGNAL: torch.rand(m, width)}
    )


# ------------------------------------------------------------------------------------------------ raters


def test_raters_are_the_text_tokens_above_the_mean():
    # 4 text tokens (rows) x 5 visual tokens; the image attention of rows 0 and 2 (0.5, 0.6) exceeds the
    # mean (0.3); rows 1 and 3 (0.05, 0.05) are not raters
    attention = torch.tensor(
        [
            [0.1, 0.0, 0.3, 0.1, 0.0],
            [0.0, 0.05, 0.0, 0.0, 0.0],
            [0.0, 0.2, 0.2, 0.0, 0.2],
            [0.05, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    expected = (attention[0] + attention[2]) / 2
    torch.testing.assert_close(rater_scores(attention), expected)
    # no text token above the mean (all equal): every text token rates
    equal = torch.tensor([[0.1, 0.3], [0.3, 0.1]])
    torch.testing.assert_close(rater_scores(equal), torch.tensor([0.2, 0.2]))


def test_scores_ignore_padding_columns_and_select_top_k():
    attention = torch.tensor(
        [
            [
                0.1,
                0.0,
                0.05,
                9.0,
            ],  # column 3 pads a row with fewer instruction tokens than the batch's longest
            [0.0, 0.05, 0.0, 9.0],
            [0.3, 0.2, 0.0, 9.0],
            [0.1, 0.0, 0.0, 0.0],
            [0.0, 0.2, 0.0, 0.0],
        ]
    )  # (n=5 visual, T=4); relevance of the 3 real text tokens: 0.5, 0.45, 0.05 -> raters 0 and 1
    image = _image(attention, m=3)
    expected = (attention[:, 0] + attention[:, 1]) / 2  # [0.05, 0.025, 0.25, 0.05, 0.1]
    torch.testing.assert_close(SparseVLM().scores(image), expected)
    assert SparseVLM().select(image, 2).keep.tolist() == [2, 4]
    assert SparseVLM().select(image, 3).keep.tolist() == [0, 2, 4]  # tie 0 / 3: the lower index
    # without instruction tokens, column 0 (the row's last token) is the only rater
    torch.testing.assert_close(SparseVLM().scores(_image(attention, m=0)), attention[:, 0])


@pytest.mark.parametrize("n,k", [(10, 1), (10, 9), (50, 13)])
def test_select_exactly_k(n, k):
    attention = torch.rand(n, 6, generator=torch.Generator().manual_seed(n))
    for recycle in (False, True):
        selection = SparseVLM(recycle=recycle).select(_image(attention, m=5, embeds=torch.randn(n, 8)), k)
        assert_valid_keep(selection.keep, n, k)
        assert (selection.merged is None) == (not recycle)


# ------------------------------------------------------------------------------------------ the signal


def _layer_inputs(model, batch, layer: int):
    """The kwargs layer `layer`'s attention module receives, its eager map and the prefill cache."""
    lm = model.model.language_model
    captured = {}
    handle = lm.layers[layer].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = lm(**batch, output_attentions=True, use_cache=True)
    finally:
        handle.remove()
    return captured, out.attentions[layer], output_cache(out)


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_text_query_scores_match_eager_rows(tiny, layer):
    model, proc = tiny("llava", "eager")
    batch = proc.tokenizer(
        [
            "USER: describe the image please ASSISTANT:",
            "w1 w2 USER: w3 w4 w5 w6 w7 w8 describe the image ASSISTANT:",
            "w1 w2 w3",
        ],
        return_tensors="pt",
        padding=True,
    )
    valid = batch["attention_mask"].bool()
    assert not valid.all(), "the batch must be left-padded"
    kwargs, eager, cache = _layer_inputs(model, batch, layer)
    length = valid.shape[1]
    # queries: some real positions of row 0, a longer list in row 1, none in row 2 (its last token)
    queries = [
        torch.tensor([length - 5, length - 2]),
        torch.arange(length - 9, length),
        torch.tensor([], dtype=torch.long),
    ]
    attn = model.model.language_model.layers[layer].self_attn
    with torch.no_grad():
        got = text_query_scores(attn, kwargs["hidden_states"], kwargs["position_embeddings"], queries, valid)
        from_cache = text_query_scores(
            attn, kwargs["hidden_states"], kwargs["position_embeddings"], queries, valid,
            keys=cached_keys(cache, layer, length),
        )  # fmt: skip
    assert got.shape == (3, length, 9) and got.dtype == torch.float32
    head_mean = eager.mean(1)  # (B, L_query, L_key): the eager softmax rows, causal and padding-masked
    for row, positions in enumerate(queries):
        positions = positions if positions.numel() else torch.tensor([length - 1])
        expected = head_mean[row, positions].T  # (L, m)
        torch.testing.assert_close(got[row, :, : positions.numel()], expected, atol=TOL, rtol=0)
        assert (got[row, :, positions.numel() :] == 0).all()
        assert (got[row][~valid[row]] == 0).all()
    torch.testing.assert_close(from_cache, got, atol=TOL, rtol=0)


def _explicit_rater_score(head_mean: torch.Tensor, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Loops over the eager map: raters = text rows whose image attention exceeds the mean; their mean row."""
    rows = [head_mean[t, image].double() for t in text.tolist()]
    relevance = [float(r.sum()) for r in rows]
    mean = sum(relevance) / len(relevance)
    raters = [r for r, rel in zip(rows, relevance) if rel > mean] or rows
    return (sum(raters) / len(raters)).float()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_rater_scores_in_the_engine_match_eager_maps(tiny, monkeypatch, family):
    """The first stage's scores (sdpa model, recomputed rows) equal the eager map's rater scores."""
    model, proc = tiny(family, "sdpa")
    eager_model, _ = tiny(family, "eager")  # same seed, same weights
    inputs = batch_inputs(family, proc, (1, 2))
    seen = []
    original = SparseVLM.select

    def record(self, image, k):
        seen.append(self.scores(image))
        return original(self, image, k)

    monkeypatch.setattr(SparseVLM, "select", record)
    with tokprune.apply(model, "sparsevlm", keep_ratio=0.25) as pruner, torch.no_grad():
        model(**inputs)
        layer = pruner.methods[-1].boundaries(len(model.model.language_model.layers))[0] - 1
    with torch.no_grad():
        eager = eager_model(**inputs, output_attentions=True).attentions[layer].mean(1)  # (B, L, L)
    visual = inputs["input_ids"] == model.config.image_token_id
    valid = inputs["attention_mask"].bool()
    if "image_grid_thw" in inputs:  # tokens per image after the 2x2 merge
        counts = [int(t * h * w) // 4 for t, h, w in inputs["image_grid_thw"].tolist()]
    else:
        counts = [int(visual.sum()) // 3] * 3
    rows = [0, 1, 1]  # row 0 holds image 0, row 1 images 1 and 2
    assert len(seen) >= 3  # the first stage's calls come first, image by image
    for image, (row, scores) in enumerate(zip(rows, seen)):
        positions = visual[row].nonzero().squeeze(1)
        start = sum(counts[i] for i in range(image) if rows[i] == row)
        per_image = positions[start : start + counts[image]]
        text = ((torch.arange(visual.shape[1]) > positions.max()) & valid[row]).nonzero().squeeze(1)
        expected = _explicit_rater_score(eager[row], text, per_image)
        torch.testing.assert_close(scores, expected, atol=TOL, rtol=0)


# -------------------------------------------------------------------------------------------- schedule


def test_published_schedules_are_reproduced():
    method = SparseVLM()
    assert method.stage_counts(576, Budget(tokens=110)) == [300, 200, 110]  # "192"
    assert method.stage_counts(576, Budget(tokens=36)) == [303, 110, 36]  # "128"
    assert method.stage_counts(576, Budget(tokens=17)) == [66, 30, 17]  # "64"
    assert method.stage_counts(576, SparseVLM.default_budget) == [300, 200, 110]
    assert method.boundaries(32) == [3, 7, 16]  # pruning after layers 2, 6, 15


def test_schedule_interpolates_between_published_ones():
    method = SparseVLM()
    # 64 of 576 lies between the "128" (36) and "192" (110) schedules: t = 28/74
    t = 28 / 74
    expected = [math.ceil(303 + t * (300 - 303)), math.ceil(110 + t * (200 - 110)), 64]
    assert method.stage_counts(576, Budget(tokens=64)) == expected == [302, 145, 64]
    # below the smallest schedule: proportional to it; above the largest: towards keep-all
    assert method.stage_counts(576, Budget(tokens=1)) == [math.ceil(66 / 17), math.ceil(30 / 17), 1]
    assert method.stage_counts(576, Budget(tokens=576)) == [576, 576, 576]
    assert method.stage_counts(16, Budget(ratio=0.25)) == [9, 7, 4]


@pytest.mark.parametrize("n", [1, 2, 16, 49, 576, 2880])
def test_schedule_is_monotone_and_bounded(n):
    method = SparseVLM()
    for final in range(1, n + 1, max(1, n // 97)):
        counts = method.stage_counts(n, Budget(tokens=final))
        assert counts[-1] == final
        assert n >= counts[0] >= counts[1] >= counts[2], (n, final, counts)


def test_layers_scale_with_depth():
    assert SparseVLM().boundaries(4) == [1, 2, 3]
    assert SparseVLM().boundaries(28) == [3, 6, 14]
    assert SparseVLM(layers=(0, 1, 2)).boundaries(4) == [1, 2, 3]


# ------------------------------------------------------------------------------------------- recycling


def test_density_peaks_find_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    sizes = [8, 6, 7]  # more than knn = 5 neighbours in each blob
    x = torch.cat([c + 0.1 * torch.randn(s, 2, generator=g) for c, s in zip(centres, sizes)])
    labels = density_peak_clusters(x, 3)
    truth = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    # the same partition (cluster ids are arbitrary)
    assert torch.equal(labels[:, None] == labels[None, :], truth[:, None] == truth[None, :])
    assert torch.equal(density_peak_clusters(x, 21), torch.arange(21))  # as many clusters as tokens


def test_recycle_into_kept_by_hand():
    # kept tokens 0 (along e0) and 1 (along e1); dropped 2..11; scores rank 2, 3, 4 on top (ceil(0.3*10)=3
    # recycled), in one cluster (3 // 10 + 1 = 1) near e1 -> absorbed by token 1
    embeds = torch.zeros(12, 3)
    embeds[0] = torch.tensor([1.0, 0.0, 0.0])
    embeds[1] = torch.tensor([0.0, 2.0, 0.0])
    embeds[2:5] = torch.tensor([[0.1, 1.0, 0.0], [0.0, 1.2, 0.1], [0.0, 0.8, 0.0]])
    embeds[5:] = torch.tensor([1.0, 0.0, 5.0])  # low-scored dropped tokens, never recycled
    scores = torch.tensor([1.0, 1.0, 0.9, 0.8, 0.7] + [0.1] * 7)
    keep = torch.tensor([0, 1])
    merged = recycle_into_kept(embeds, scores, keep)
    torch.testing.assert_close(merged[0], embeds[0])
    torch.testing.assert_close(merged[1], embeds[[1, 2, 3, 4]].mean(0))


def _merged_by_definition(image: ImageTokens, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The stated definition, written out token by token."""
    n = image.n
    dropped = [i for i in range(n) if i not in keep.tolist()]
    r = math.ceil(0.3 * len(dropped))
    recycled = sorted(dropped, key=lambda i: (-float(scores[i]), i))[:r]
    labels = density_peak_clusters(image.embeds[recycled], min(r, r // 10 + 1)).tolist()
    out = {int(i): [image.embeds[i].float()] for i in keep}
    for label in sorted(set(labels)):
        members = [image.embeds[recycled[j]].float() for j, lab in enumerate(labels) if lab == label]
        mean = torch.stack(members).mean(0)
        sims = [float(F.cosine_similarity(mean, image.embeds[i].float(), dim=0)) for i in keep.tolist()]
        out[int(keep[max(range(len(sims)), key=lambda j: (sims[j], -j))])] += members
    return torch.stack([torch.stack(out[int(i)]).mean(0) for i in keep])


def test_recycling_keeps_the_pruning_set_and_follows_its_definition():
    g = torch.Generator().manual_seed(3)
    n, k = 60, 12
    image = _image(torch.rand(n, 7, generator=g), m=6, embeds=torch.randn(n, 16, generator=g))
    plain = SparseVLM().select(image, k)
    recycled = SparseVLM(recycle=True).select(image, k)
    assert torch.equal(plain.keep, recycled.keep)
    expected = _merged_by_definition(image, SparseVLM().scores(image), plain.keep)
    torch.testing.assert_close(recycled.merged, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(recycled.merged, image.embeds[plain.keep])  # something was recycled


def test_engine_writes_the_recycled_states(tiny, monkeypatch):
    """Inside the LLM, the kept tokens carry the method's merged states; text tokens are untouched."""
    model, proc = tiny("llava", "sdpa")
    inputs = batch_inputs("llava", proc, (1,))
    lm = model.model.language_model
    merges = []
    original = SparseVLM.select

    def record(self, image, k):
        selection = original(self, image, k)
        merges.append(selection)
        return selection

    monkeypatch.setattr(SparseVLM, "select", record)
    with tokprune.apply(model, "sparsevlm", keep_ratio=0.25, recycle=True) as pruner:
        boundary = pruner.methods[-1].boundaries(len(lm.layers))[0]
        seen = {}

        def before(module, args, output) -> None:
            seen.setdefault("before", output[0] if isinstance(output, tuple) else output)

        def after(module, args, kwargs) -> None:
            seen.setdefault("after", args[0] if args else kwargs["hidden_states"])

        handles = [
            lm.layers[boundary - 1].register_forward_hook(before),
            lm.layers[boundary].register_forward_pre_hook(after, with_kwargs=True),
        ]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        stats = pruner.stats
    before = seen["before"]
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    kept = visual[stats.stages[0].kept[0]]
    keep = torch.ones(before.shape[1], dtype=torch.bool)
    keep[visual] = False
    keep[kept] = True
    expected = before[0].clone()
    expected[kept] = merges[0].merged
    assert torch.equal(seen["after"][0], expected[keep])
    assert stats.visual_kept == [math.ceil(0.25 * 49)]


def test_recycling_generates_with_exact_counts(tiny):
    model, proc = tiny("qwen2_vl", "sdpa")
    inputs = batch_inputs("qwen2_vl", proc, (1, 2))
    runs = {}
    for recycle in (False, True):
        with tokprune.apply(model, "sparsevlm", keep_ratio=0.25, recycle=recycle) as pruner, torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
            runs[recycle] = pruner.stats
    assert runs[True].layer_tokens == runs[False].layer_tokens
    first = [[k.tolist() for k in runs[r].stages[0].kept] for r in (True, False)]
    assert first[0] == first[1]  # later stages score recycled states, so only the first set must agree


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "options",
    [
        {"layers": (2, 6)},
        {"layers": [2, 6, 15.0]},
        {"layers": 2},
        {"recycle": 1},
        {"recycle_ratio": 0},
        {"recycle_ratio": 1.5},
        {"recycle_ratio": True},
        {"cluster_size": 0},
        {"cluster_size": 2.5},
    ],
)
def test_option_errors(options):
    with pytest.raises(MethodOptionError, match="sparsevlm"):
        make_method("sparsevlm", options)


@pytest.mark.parametrize("layers", [(2, 2, 3), (3, 2, 1), (-1, 0, 1), (0, 1, 3)])
def test_layers_must_fit_the_llm(layers):
    with pytest.raises(MethodOptionError, match="strictly increasing"):
        SparseVLM(layers=layers).boundaries(4)


def test_errors_reach_the_caller(tiny):
    model, _ = tiny("llava", "sdpa")
    with pytest.raises(MethodOptionError, match="strictly increasing"):
        tokprune.apply(model, "sparsevlm", layers=(2, 6, 15))  # a 4-layer LLM
    with pytest.raises(MethodOptionError, match="no option"):
        tokprune.apply(model, "sparsevlm", ratio=0.3)
    with pytest.raises(MethodOptionError):
        SparseVLM().boundaries(3)  # three stages need at least 4 layers
