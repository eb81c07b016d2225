"""SparseVLM: raters and scores on hand-made attention, the text-query signal and the rater score against eager
attention maps, the stage schedule, the code's recycling (counts, clustering, layout) and the earlier "within"
recycling (density peaks, Eq. 8-9, cosine assignment) against their definitions, option errors. Agreement with
the authors' code: tests/agreement/test_sparsevlm.py."""

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
    RECYCLE,
    RELEVANCE,
    SIGNAL,
    SparseVLM,
    code_clusters,
    code_recycle_select,
    code_recycled,
    code_split,
    density_peak_clusters,
    density_peaks,
    rater_scores,
    recycle_select,
)
from tokprune.signals.llm import cached_keys, input_text_relevance, text_query_scores

TOL = 1e-5


def _image(
    attention: torch.Tensor,
    m: int | None = None,
    embeds: torch.Tensor | None = None,
    relevance: torch.Tensor | None = None,
) -> ImageTokens:
    """An image whose signal is `attention` (n, T), with m instruction tokens (text rows) of the row and
    the image's instruction relevance `relevance` (T,) on every token (default: uniform over the m)."""
    n, width = attention.shape
    m = width if m is None else m
    embeds = torch.randn(n, 4, generator=torch.Generator().manual_seed(0)) if embeds is None else embeds
    if relevance is None:
        relevance = torch.zeros(width)
        relevance[: max(m, 1)] = 1 / max(m, 1)
    signals = {SIGNAL: attention, RELEVANCE: relevance.expand(n, width)}
    return ImageTokens(embeds=embeds, grid=None, signals=signals, text={SIGNAL: torch.rand(m, width)})


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


def test_a_text_token_at_the_mean_rates():
    # Eq. 5: raters are the tokens with r_i >= mean(r). Image attention 1, 2, 3 (mean 2, exact in float):
    # rows 1 and 2 rate; a strict "> mean" would keep row 2 alone ([2, 1])
    attention = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 1.0]])
    torch.testing.assert_close(rater_scores(attention), torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(rater_scores(attention, strict=True), attention[2])  # the code's "> mean"


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
    method = SparseVLM(raters="attention", recycle="off")
    expected = (attention[:, 0] + attention[:, 1]) / 2  # [0.05, 0.025, 0.25, 0.05, 0.1]
    torch.testing.assert_close(method.scores(image), expected)
    assert method.select(image, 2).keep.tolist() == [2, 4]
    assert method.select(image, 3).keep.tolist() == [0, 2, 4]  # tie 0 / 3: the lower index
    # without instruction tokens, column 0 (the row's last token) is the only rater
    torch.testing.assert_close(method.scores(_image(attention, m=0)), attention[:, 0])
    torch.testing.assert_close(SparseVLM().scores(_image(attention, m=0)), attention[:, 0])


def test_embedding_raters_come_from_the_relevance_signal():
    # the same attention; the input relevance of the 3 instruction tokens (0.2, 0.1, 0.7; column 3 is
    # padding) makes token 2 alone rate (mean 1/3), whatever the attention rows say
    attention = torch.rand(5, 4, generator=torch.Generator().manual_seed(3))
    image = _image(attention, m=3, relevance=torch.tensor([0.2, 0.1, 0.7, 0.0]))
    torch.testing.assert_close(SparseVLM().scores(image), attention[:, 2])
    # two tokens of equal relevance: none is above the mean, so both rate (the code would have no rater)
    tied = _image(attention, m=2, relevance=torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(SparseVLM().scores(tied), attention[:, :2].mean(1))
    # relevance 1, 2, 3 (mean 2, exact): the code's "> mean" (default) takes token 2, Eq. 5's ">=" 1 and 2
    at_mean = _image(attention, m=3, relevance=torch.tensor([1.0, 2.0, 3.0, 0.0]))
    torch.testing.assert_close(SparseVLM().scores(at_mean), attention[:, 2])
    torch.testing.assert_close(SparseVLM(rater_rule="at_least").scores(at_mean), attention[:, 1:3].mean(1))


@pytest.mark.parametrize("n,k", [(10, 1), (10, 9), (50, 13)])
def test_select_exactly_k(n, k):
    attention = torch.rand(n, 6, generator=torch.Generator().manual_seed(n))
    for recycle in RECYCLE:
        selection = SparseVLM(recycle=recycle).select(_image(attention, m=5, embeds=torch.randn(n, 8)), k)
        assert_valid_keep(selection.keep, n, k)
        assert (selection.merged is None) == (recycle == "off")


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


def test_input_text_relevance_follows_eq_4():
    """Per image: mean over its visual tokens of the softmax over the instruction of <h_v, h_t>."""
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 9, 6, generator=g)
    image_id = torch.tensor([[-1, 0, 0, 0, -1, -1, -1, -1, -1], [-1, -1, 1, 1, 2, 2, 2, -1, -1]])
    instruction = [torch.tensor([5, 6, 8]), torch.tensor([], dtype=torch.long)]
    got = input_text_relevance(embeds, image_id, instruction)
    assert got.shape == (2, 9, 3) and got.dtype == torch.float32
    text = embeds[0, [5, 6, 8]].double()
    softmax = [torch.softmax(embeds[0, v].double() @ text.T, dim=0) for v in (1, 2, 3)]
    expected = (sum(softmax) / 3).float()
    for v in (1, 2, 3):
        torch.testing.assert_close(got[0, v], expected, atol=1e-6, rtol=0)
    assert (got[0, [0, 4, 5, 6, 7, 8]] == 0).all()
    # a row without instruction: its last token is the one rater, column 0, on every image token
    assert got[1, 2:7].tolist() == [[1.0, 0.0, 0.0]] * 5 and (got[1, [0, 1, 7, 8]] == 0).all()


def _explicit_rater_score(
    head_mean: torch.Tensor, text: torch.Tensor, image: torch.Tensor, strict: bool
) -> torch.Tensor:
    """Loops over the eager map: raters = text rows whose image attention is above (strict) / at least the
    mean; their mean row."""
    rows = [head_mean[t, image].double() for t in text.tolist()]
    relevance = [float(r.sum()) for r in rows]
    mean = sum(relevance) / len(relevance)
    raters = [r for r, rel in zip(rows, relevance) if (rel > mean if strict else rel >= mean)] or rows
    return (sum(raters) / len(raters)).float()


def _explicit_embedding_raters(
    embeds: torch.Tensor, text: torch.Tensor, image: torch.Tensor, strict: bool
) -> list[int]:
    """Eq. 4-6 written out in float64 on the LLM input embeds (L, D): the rating text tokens (indices),
    above (strict, the code) or at least (Eq. 5) the mean."""
    relevance = [0.0] * len(text)
    for v in image.tolist():
        logits = [float(embeds[v].double() @ embeds[t].double()) for t in text.tolist()]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        for i, w in enumerate(weights):
            relevance[i] += w / sum(weights) / len(image)
    mean = sum(relevance) / len(relevance)
    tol = -1e-9 if strict else 1e-9
    return [i for i, r in enumerate(relevance) if r > mean + tol] or list(range(len(text)))


@pytest.mark.parametrize("rule", ["above", "at_least"])
@pytest.mark.parametrize("raters", ["embeddings", "attention"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_rater_scores_in_the_engine_match_eager_maps(tiny, monkeypatch, family, raters, rule):
    """The first stage's scores (sdpa model, recomputed rows) equal the eager map's rater scores, with the
    raters of the LLM-input embeddings (Eq. 4-6) or of the stage's own attention rows."""
    model, proc = tiny(family, "sdpa")
    eager_model, _ = tiny(family, "eager")  # same seed, same weights
    inputs = batch_inputs(family, proc, (1, 2))
    seen = []
    original = SparseVLM.select

    def record(self, image, k):
        seen.append(self.scores(image))
        return original(self, image, k)

    monkeypatch.setattr(SparseVLM, "select", record)
    options = dict(keep_ratio=0.25, raters=raters, rater_rule=rule)
    with tokprune.apply(model, "sparsevlm", **options) as pruner, torch.no_grad():
        model(**inputs)
        layer = pruner.methods[-1].boundaries(len(model.model.language_model.layers))[0] - 1
    lm_input = {}
    handle = eager_model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lm_input.update(kwargs), with_kwargs=True
    )
    with torch.no_grad():
        eager = eager_model(**inputs, output_attentions=True).attentions[layer].mean(1)  # (B, L, L)
    handle.remove()
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
        if raters == "embeddings":
            chosen = _explicit_embedding_raters(
                lm_input["inputs_embeds"][row], text, per_image, rule == "above"
            )
            expected = eager[row][text[chosen]][:, per_image].double().mean(0).float()
        else:
            expected = _explicit_rater_score(eager[row], text, per_image, rule == "above")
        torch.testing.assert_close(scores, expected, atol=TOL, rtol=0)


def test_embedding_raters_are_chosen_once_on_the_llm_input(tiny, monkeypatch):
    """Every stage of an image reads the relevance of its LLM-input tokens, the same row at every stage."""
    model, proc = tiny("llava", "sdpa")
    inputs = batch_inputs("llava", proc, (1, 2))
    rows = []
    original = SparseVLM.select

    def record(self, image, k):
        assert bool((image.signals[RELEVANCE] == image.signals[RELEVANCE][0]).all())  # one row per image
        rows.append(image.signals[RELEVANCE][0].clone())
        return original(self, image, k)

    monkeypatch.setattr(SparseVLM, "select", record)
    with tokprune.apply(model, "sparsevlm", keep_ratio=0.25) as pruner, torch.no_grad():
        model(**inputs)
    assert [s.where.startswith("llm@") for s in pruner.stats.stages] == [True] * 3
    assert len(rows) == 9  # 3 images x 3 stages, stage by stage
    for image in range(3):
        assert torch.equal(rows[image], rows[3 + image]) and torch.equal(rows[image], rows[6 + image])


# -------------------------------------------------------------------------------------------- schedule


def test_published_schedules_are_reproduced():
    method = SparseVLM()
    assert method.topk_counts(576, Budget(tokens=110)) == [300, 200, 110]  # "192"
    assert method.topk_counts(576, Budget(tokens=36)) == [303, 110, 36]  # "128"
    assert method.topk_counts(576, Budget(tokens=17)) == [66, 30, 17]  # "64"
    assert method.topk_counts(576, SparseVLM.default_budget) == [300, 200, 110]
    assert method.boundaries(32) == [3, 7, 16]  # pruning after layers 2, 6, 15
    # the code's recycling adds its clusters on top of each stage's top-k: 300 + 9, 200 + 4, 110 + 3
    assert method.stage_counts(576, SparseVLM.default_budget) == [309, 204, 113]
    for recycle in ("off", "within"):
        assert SparseVLM(recycle=recycle).stage_counts(576, Budget(tokens=110)) == [300, 200, 110]


def test_schedule_interpolates_between_published_ones():
    method = SparseVLM()
    # 64 of 576 lies between the "128" (36) and "192" (110) schedules: t = 28/74
    t = 28 / 74
    expected = [math.ceil(303 + t * (300 - 303)), math.ceil(110 + t * (200 - 110)), 64]
    assert method.topk_counts(576, Budget(tokens=64)) == expected == [302, 145, 64]
    # below the smallest schedule: proportional to it; above the largest: towards keep-all
    assert method.topk_counts(576, Budget(tokens=1)) == [math.ceil(66 / 17), math.ceil(30 / 17), 1]
    assert method.topk_counts(576, Budget(tokens=576)) == [576, 576, 576]
    assert method.topk_counts(16, Budget(ratio=0.25)) == [9, 7, 4]
    # with the clusters: 302 + c(274) = 311, 145 + c(166) = 151, 64 + c(87) = 67
    assert method.stage_counts(576, Budget(tokens=64)) == [311, 151, 67]
    assert method.stage_counts(576, Budget(tokens=576)) == [576, 576, 576]


@pytest.mark.parametrize("n", [1, 2, 16, 49, 576, 2880])
def test_schedule_is_monotone_and_bounded(n):
    method = SparseVLM()
    for final in range(1, n + 1, max(1, n // 97)):
        topk = method.topk_counts(n, Budget(tokens=final))
        assert topk[-1] == final
        assert n >= topk[0] >= topk[1] >= topk[2], (n, final, topk)
        assert SparseVLM(recycle="off").stage_counts(n, Budget(tokens=final)) == topk
        counts = method.stage_counts(n, Budget(tokens=final))
        assert n >= counts[0] >= counts[1] >= counts[2], (n, final, counts)
        before = n
        for k, count in zip(topk, counts):  # each stage: its top-k plus the code's clusters, or nothing
            k = min(k, before)
            assert count == (before if k >= before else k + code_recycled(before - k)[1])
            if count < before:  # select's split: this k, or the larger one of a plateau (same count)
                top, clusters = code_split(before, count)
                assert top + clusters == count and top in (k, k + 1)
            before = count


def test_layers_scale_with_depth():
    assert SparseVLM().boundaries(4) == [1, 2, 3]
    assert SparseVLM().boundaries(28) == [3, 6, 14]
    assert SparseVLM(layers=(0, 1, 2)).boundaries(4) == [1, 2, 3]


# ------------------------------------------------------------------------------------------- recycling


def test_density_peaks_find_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])  # apart in direction (cosine assignment)
    sizes = [8, 6, 7]  # more than knn = 5 neighbours in each blob
    x = torch.cat([c + 0.1 * torch.randn(s, 2, generator=g) for c, s in zip(centres, sizes)])
    labels = density_peak_clusters(x, 3)
    truth = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    # the same partition (cluster ids are arbitrary)
    assert torch.equal(labels[:, None] == labels[None, :], truth[:, None] == truth[None, :])
    assert torch.equal(density_peak_clusters(x, 21), torch.arange(21))  # as many clusters as tokens


def _explicit_density_peaks(x: torch.Tensor, c: int, knn: int = 5) -> tuple[list[int], list[int]]:
    """Eq. 8-9 written out in float64: rho, delta, centres by rho * delta, cosine assignment."""
    r, x = x.shape[0], x.double()
    d = [[float((x[i] - x[j]).norm()) for j in range(r)] for i in range(r)]
    k = min(knn, r - 1)
    rho = [
        math.exp(-sum(v**2 for v in sorted(d[i][j] for j in range(r) if j != i)[:k]) / k) for i in range(r)
    ]
    delta = []
    for i in range(r):
        denser = [d[i][j] for j in range(r) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(denser) if denser else max(d[i]))
    centres = sorted(sorted(range(r), key=lambda i: (-rho[i] * delta[i], i))[:c])
    labels = []
    for i in range(r):
        if i in centres:
            labels.append(centres.index(i))
            continue
        cos = [float(F.cosine_similarity(x[i], x[j], dim=0)) for j in centres]
        labels.append(max(range(c), key=lambda a: (cos[a], -a)))
    return centres, labels


@pytest.mark.parametrize("seed,r,c", [(0, 20, 3), (1, 12, 2), (2, 31, 4), (3, 4, 1)])
def test_density_peaks_follow_eq_8_and_9(seed, r, c):
    x = 0.7 * torch.randn(r, 3, generator=torch.Generator().manual_seed(seed))
    centres, labels = density_peaks(x, c)
    assert (centres.tolist(), labels.tolist()) == _explicit_density_peaks(x, c)


def test_density_peaks_assign_by_cosine_similarity():
    # two tight blobs along 0 and 45 degrees; p = (2, 1.8) lies next to blob A in Euclidean distance
    # (2.1 against 11.4) but points along blob B (42 degrees): the paper's cosine rule puts it with B
    blob_a = [[1.0, 0.0], [1.02, 0.0], [0.98, 0.0], [1.0, 0.02], [1.0, -0.02], [1.01, 0.01]]
    blob_b = [[10.0, 10.0], [10.2, 10.0], [9.8, 10.0], [10.0, 10.2], [10.0, 9.8], [10.1, 10.1]]
    x = torch.tensor(blob_a + blob_b + [[2.0, 1.8]])
    centres, labels = density_peaks(x, 2)
    assert centres.tolist() == [0, 6]  # the densest token of each blob
    assert labels.tolist() == [0] * 6 + [1] * 7


def test_recycle_select_by_hand():
    # n = 12, k = 4: N = 8 removed, ceil(0.3 * 8) = 3 recycled into 3 // 10 + 1 = 1 token, which takes one of
    # the 4 slots: tokens 0, 1, 2 (best scores) stay as they are; 3, 4, 5 (next best) form one cluster
    embeds = torch.zeros(12, 3)
    embeds[0] = torch.tensor([1.0, 0.0, 0.0])
    embeds[1] = torch.tensor([0.0, 2.0, 0.0])
    embeds[2] = torch.tensor([0.0, 0.0, 1.0])
    embeds[3:6] = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.5, 0.0], [0.0, 1.1, 0.0]])
    embeds[6:] = torch.tensor([5.0, 5.0, 5.0])  # low-scored, neither kept nor recycled
    scores = torch.tensor([1.0, 0.95, 0.9, 0.8, 0.7, 0.6] + [0.1] * 6)
    # Eq. 8 with its 2 neighbours: log rho = -0.13, -0.205, -0.085 for tokens 3, 4, 5; token 5 is the densest
    # (delta = its largest distance, 0.4), token 4's nearest denser one is 5 (0.4), token 3's is 5 (0.1):
    # rho * delta is largest for token 5, the cluster's centre, so the cluster's mean sits at index 5
    keep, merged = recycle_select(embeds, scores, 4)
    assert keep.tolist() == [0, 1, 2, 5]
    torch.testing.assert_close(merged[:3], embeds[:3])
    torch.testing.assert_close(merged[3], torch.tensor([0.0, 1.2, 0.0]))
    # k = 1: ceil(0.3 * 11) = 4 recycled into the one slot, so the 4 best tokens make it, at their centre
    # (token 3: mean squared distance to the other 3 is 5/3, the others' 3 or more)
    keep, merged = recycle_select(embeds, scores, 1)
    assert keep.tolist() == [3]
    torch.testing.assert_close(merged, embeds[:4].mean(0, keepdim=True))


def _recycled_by_definition(
    image: ImageTokens, scores: torch.Tensor, k: int
) -> tuple[list[int], torch.Tensor]:
    """The stated definition, written out token by token."""
    order = sorted(range(image.n), key=lambda i: (-float(scores[i]), i))
    r = math.ceil(0.3 * (image.n - k))
    c = min(r // 10 + 1, r, k)
    kept, recycled = order[: k - c], order[k - c : k - c + r]
    centres, labels = density_peaks(image.embeds[recycled], c)
    out = {i: image.embeds[i].float() for i in kept}
    for label, centre in enumerate(centres.tolist()):
        members = [image.embeds[recycled[j]].float() for j, lab in enumerate(labels.tolist()) if lab == label]
        out[recycled[centre]] = torch.stack(members).mean(0)
    return sorted(out), torch.stack([out[i] for i in sorted(out)])


def test_within_recycling_follows_its_definition():
    g = torch.Generator().manual_seed(3)
    n, k = 60, 12  # N = 48: ceil(14.4) = 15 recycled into 2 tokens, 10 tokens kept as they are
    image = _image(torch.rand(n, 7, generator=g), m=6, embeds=torch.randn(n, 16, generator=g))
    plain = SparseVLM(recycle="off").select(image, k)
    recycled = SparseVLM(recycle="within").select(image, k)
    assert_valid_keep(recycled.keep, n, k)
    keep, expected = _recycled_by_definition(image, SparseVLM().scores(image), k)
    assert recycled.keep.tolist() == keep
    torch.testing.assert_close(recycled.merged, expected, atol=1e-5, rtol=1e-5)
    # the 10 best-scored tokens stay, unchanged; the 2 other slots hold cluster means
    top = SparseVLM(recycle="off").select(image, k - 2).keep
    assert set(top.tolist()) <= set(recycled.keep.tolist()) and set(top.tolist()) <= set(plain.keep.tolist())
    same = torch.isin(recycled.keep, top)
    torch.testing.assert_close(recycled.merged[same], image.embeds[recycled.keep[same]])
    assert not torch.allclose(recycled.merged[~same], image.embeds[recycled.keep[~same]])


@pytest.mark.parametrize("recycle", ["code", "within"])
def test_engine_writes_the_recycled_states(tiny, monkeypatch, recycle):
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
    with tokprune.apply(model, "sparsevlm", keep_ratio=0.25, recycle=recycle) as pruner:
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
    assert stats.visual_kept == [SparseVLM(recycle=recycle).stage_counts(49, Budget(ratio=0.25))[-1]]


def test_within_recycling_generates_with_exact_counts(tiny):
    model, proc = tiny("qwen2_vl", "sdpa")
    inputs = batch_inputs("qwen2_vl", proc, (1, 2))
    runs = {}
    for recycle in ("off", "within"):
        with tokprune.apply(model, "sparsevlm", keep_ratio=0.25, recycle=recycle) as pruner, torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
            runs[recycle] = pruner.stats
    assert runs["within"].layer_tokens == runs["off"].layer_tokens
    # the first stage scores the same states either way: the recycled run keeps the k - c best of the
    # plain run's k tokens and puts its c cluster tokens in the other slots (later stages score recycled
    # states, so only the first stage is compared)
    n_image = [int(t * h * w) // 4 for t, h, w in inputs["image_grid_thw"].tolist()]
    images_of_row = [[0], [1, 2]]  # row 1 holds two images: its kept set is theirs together
    first_stage = [SparseVLM(recycle="off").stage_counts(n, Budget(ratio=0.25))[0] for n in n_image]
    for images, with_recycling, plain in zip(
        images_of_row, runs["within"].stages[0].kept, runs["off"].stages[0].kept
    ):
        assert plain.numel() == with_recycling.numel() == sum(first_stage[i] for i in images)
        clusters = 0
        for i in images:
            r = math.ceil(0.3 * (n_image[i] - first_stage[i]))
            clusters += min(r // 10 + 1, r, first_stage[i])
        assert len(set(with_recycling.tolist()) & set(plain.tolist())) >= plain.numel() - clusters


# ------------------------------------------------------------------------------- the code's recycling


def test_code_recycled_counts():
    assert code_recycled(276) == (83, 9)  # "192", first stage: 576 - 300 dropped
    assert code_recycled(109) == (33, 4) and code_recycled(94) == (29, 3)
    assert code_recycled(10) == (4, 1)  # int(10 * 0.3) + 1: Python's float product, as the code
    assert code_recycled(1) == (1, 1) and code_recycled(0) == (0, 0)
    assert code_recycled(50, ratio=1.0, cluster_size=1) == (50, 50)  # capped: r <= N, c <= r


@pytest.mark.parametrize("n", [5, 49, 576])
def test_code_split_recovers_the_top_k(n):
    totals = [k + code_recycled(n - k)[1] for k in range(n)]
    assert all(b - a in (0, 1) for a, b in zip(totals, totals[1:]))  # every count in range is reached
    for total in totals:
        got = code_split(n, total)
        assert sum(got) == total and got[0] == max(j for j, t in enumerate(totals) if t == total)
    assert code_split(576, 309) == (300, 9)
    assert code_split(49, 1) == (0, 1)  # below c(n): no top-k, one cluster


def test_code_clusters_by_hand():
    # 1-D points (D = 1: no distance scale); with c = 2 each density uses its own 0 and its nearest other
    # token, 0.1 away for every token: all densities tie, the earlier token counts as denser. delta: token
    # 0 (densest) the largest distance 5.1; 1 -> 0.1 (to 0); 2 -> 0.1; 3 -> 4.8 (to 2); 4 -> 0.1 (to 3):
    # centres 0 and 3 (scores 5.1 rho, 4.8 rho), the clusters {0, 1, 2} and {3, 4}
    x = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1]])
    centres, labels, merged = code_clusters(x, 2)
    assert centres.tolist() == [0, 3] and labels.tolist() == [0, 0, 0, 1, 1]
    expected = torch.tensor([[0.3 / (3 + 1e-6)], [10.1 / (2 + 1e-6)]])
    torch.testing.assert_close(merged, expected)
    # the distances are scaled by 1 / sqrt(D): the same points in D = 4 (repeated) cluster the same way
    assert code_clusters(x.repeat(1, 4), 2)[1].tolist() == labels.tolist()
    # one cluster: the weighted mean of all
    torch.testing.assert_close(code_clusters(x, 1)[2], x.sum(0, keepdim=True) / (5 + 1e-6))


def test_code_recycle_select_layout():
    g = torch.Generator().manual_seed(0)
    n, embeds, scores = 60, torch.randn(60, 8, generator=g), torch.rand(60, generator=g)
    k, c = 20, code_recycled(40)[1]  # 40 dropped: 13 recycled into 2 clusters
    selection = code_recycle_select(embeds, scores, k + c)
    assert_valid_keep(selection.keep, n, k + c)
    ranked = torch.sort(scores, descending=True).indices
    top = ranked[:k].sort().values
    assert selection.keep[~selection.extra].tolist() == top.tolist()
    torch.testing.assert_close(selection.merged[~selection.extra], embeds[top])
    recycled = ranked[k : k + 13]
    centres, _, merged = code_clusters(embeds[recycled], c)
    emitted = selection.keep[selection.order]  # the code's order: the kept tokens, then the clusters
    assert emitted[:k].tolist() == top.tolist() and emitted[k:].tolist() == recycled[centres].tolist()
    torch.testing.assert_close(selection.merged[selection.order][k:], merged)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "options",
    [
        {"layers": (2, 6)},
        {"layers": [2, 6, 15.0]},
        {"layers": 2},
        {"recycle": 1},
        {"recycle": True},
        {"recycle": "paper"},
        {"rater_rule": ">="},
        {"recycle_ratio": 0},
        {"recycle_ratio": 1.5},
        {"recycle_ratio": True},
        {"cluster_size": 0},
        {"cluster_size": 2.5},
        {"raters": "text"},
        {"raters": None},
    ],
)
def test_option_errors(options):
    with pytest.raises(MethodOptionError, match="sparsevlm"):
        make_method("sparsevlm", options)


@pytest.mark.parametrize(
    "options", [{"recycle_ratio": 0.5}, {"cluster_size": 4}, {"recycle_ratio": 0.1, "cluster_size": 2}]
)
def test_recycling_options_need_recycle(options):
    """recycle_ratio / cluster_size would be ignored with recycle="off": an error that says which option
    needs which setting; with recycling (the default "code", or "within"), or at their defaults, fine."""
    names = " and ".join(options)
    with pytest.raises(MethodOptionError, match=f"sparsevlm: {names} .*used only with recycle='code' or"):
        make_method("sparsevlm", {**options, "recycle": "off"})
    assert make_method("sparsevlm", options).recycle == "code"
    assert make_method("sparsevlm", {**options, "recycle": "within"}).recycle == "within"
    make_method("sparsevlm", {"recycle_ratio": 0.3, "cluster_size": 10, "recycle": "off"})  # the defaults


def test_recycle_choices_are_named():
    with pytest.raises(MethodOptionError, match="recycle must be one of \\('code', 'within', 'off'\\)"):
        make_method("sparsevlm", {"recycle": True})


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
