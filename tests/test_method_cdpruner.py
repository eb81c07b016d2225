"""CDPruner: conditional DPP (relevance x similarity kernel) with greedy MAP inference.

Expected values are computed independently of the library: by construction (clusters), or by a
brute-force greedy that maximises log det(L_S) with torch.linalg.slogdet in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checks import assert_valid_keep

from tokprune.core.budget import Budget
from tokprune.core.layout import Unit
from tokprune.errors import MethodOptionError
from tokprune.methods.base import ImageTokens, Method
from tokprune.methods.cdpruner import CDPruner, greedy_dpp_map, instruction_relevance

PAPER_SIGN = {"negate_relevance": False}  # relevance = similarity to the instruction (the paper's text)


def _image(embeds: torch.Tensor, text: torch.Tensor | None = None) -> ImageTokens:
    return ImageTokens(embeds=embeds, grid=None, signals={}, text={} if text is None else {"embeds": text})


def _brute_force_greedy(x: torch.Tensor, q: torch.Tensor, k: int) -> list[int]:
    """Greedy on log det(L_S), L = diag(q) cos(x) diag(q), by slogdet of every candidate set (float64)."""
    x = F.normalize(x.double(), dim=-1)
    q = q.double()
    kernel = q[:, None] * (x @ x.T) * q[None, :]
    chosen: list[int] = []
    for _ in range(k):
        best, best_i = -float("inf"), -1
        for i in range(x.shape[0]):
            if i in chosen:
                continue
            idx = torch.tensor([*chosen, i])
            sign, logdet = torch.linalg.slogdet(kernel[idx][:, idx])
            value = logdet.item() if sign > 0 else -float("inf")
            if value > best:
                best, best_i = value, i
        chosen.append(best_i)
    return chosen


def _clusters(seed: int = 0, noise: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Clusters A = 0..2 (e0), B = 3..5 (e1), C = 6..8 (e2) of near-duplicates, token 9 (e3) alone."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(8)
    centres = [eye[0]] * 3 + [eye[1]] * 3 + [eye[2]] * 3 + [eye[3]]
    x = torch.stack(centres) + noise * torch.randn(10, 8, generator=g)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    return x, groups


# ---------------------------------------------------------------------------------------- metadata


def test_class_attributes():
    assert issubclass(CDPruner, Method)
    assert CDPruner.name == "cdpruner"
    assert CDPruner.where == "pre"
    assert CDPruner.signals == ("instruction",)
    assert CDPruner.default_budget == Budget(tokens=128)
    assert "2506.10967" in CDPruner.paper
    m = CDPruner()
    assert m.theta is None and m.negate_relevance is True and m.units == "per_unit"
    assert CDPruner.code_families == ("llava", "llava_next")


@pytest.mark.parametrize("theta", [-0.1, 1.0, 2, True])
def test_invalid_theta(theta):
    with pytest.raises(MethodOptionError):
        CDPruner(theta=theta)


@pytest.mark.parametrize("options", [{"units": "each"}, {"units": None}, {"negate_relevance": 1}])
def test_invalid_variant_options(options):
    with pytest.raises(MethodOptionError, match=next(iter(options))):
        CDPruner(**options)


# --------------------------------------------------------------------------------------- relevance


def test_relevance_is_min_max_normalised_mean_cosine():
    g = torch.Generator().manual_seed(1)
    v, t = torch.randn(7, 5, generator=g), torch.randn(3, 5, generator=g)
    s = torch.tensor(
        [sum(F.cosine_similarity(v[i], t[j], dim=0).item() for j in range(3)) / 3 for i in range(7)],
        dtype=torch.float64,
    )
    expected = (s - s.min() + 1e-6) / (s.max() - s.min() + 1e-6)
    r = instruction_relevance(v, t, negate=False)
    assert r.dtype == torch.float32
    torch.testing.assert_close(r.double(), expected, atol=1e-6, rtol=1e-5)
    assert r.max().item() == pytest.approx(1.0) and r.min().item() > 0
    # the default is the authors' code: the mean cosine negated before the min-max step
    neg = instruction_relevance(v, t)
    expected_neg = (-s - (-s).min() + 1e-6) / ((-s).max() - (-s).min() + 1e-6)
    torch.testing.assert_close(neg.double(), expected_neg, atol=1e-6, rtol=1e-5)
    assert neg.argmax().item() == s.argmin().item()


def test_relevance_equals_cosine_with_the_pooled_unit_text_vector():
    # mean_j cos(v, t_j) = v/|v| . mean_j t_j/|t_j|; the min-max step removes the pooled vector's norm
    g = torch.Generator().manual_seed(2)
    v, t = torch.randn(9, 6, generator=g), torch.randn(5, 6, generator=g)
    pooled = F.normalize(t, dim=-1).mean(0, keepdim=True)
    torch.testing.assert_close(
        instruction_relevance(v, t), instruction_relevance(v, pooled), atol=1e-5, rtol=0
    )


# ------------------------------------------------------------------------------- behaviour by design


def test_picks_one_token_from_each_relevant_cluster():
    x, groups = _clusters()
    e = torch.eye(8)
    # the instruction points at clusters A and B and away from the lone token 9
    text = torch.stack([e[0] - e[3], e[1] - e[3]])
    for theta in (None, 0.5):
        keep = CDPruner(theta=theta, **PAPER_SIGN).select(_image(x, text), 2).keep
        assert sorted(groups[keep].tolist()) == [0, 1], (theta, keep)
    # the code's negated relevance favours what the instruction points away from: the lone token 9
    assert 9 in CDPruner().select(_image(x, text), 2).keep.tolist()


def test_relevance_steers_the_first_pick():
    x, groups = _clusters()
    text = torch.eye(8)[2:3]  # the instruction is about cluster C only
    keep = CDPruner(**PAPER_SIGN).select(_image(x, text), 1).keep
    assert groups[keep].tolist() == [2]
    assert groups[CDPruner().select(_image(x, text), 1).keep].tolist() != [2]


def test_uniform_relevance_without_instruction_is_plain_dpp():
    x, groups = _clusters()
    for image in (_image(x), _image(x, torch.empty(0, 8))):
        keep = CDPruner().select(image, 4).keep
        assert sorted(groups[keep].tolist()) == [0, 1, 2, 3]  # no two near-duplicates
        expected = greedy_dpp_map(x, torch.ones(10), 4).sort().values
        assert torch.equal(keep, expected)
    # equal qualities: the first pick is the lowest index (diag(L) is exact, no rounding noise)
    assert greedy_dpp_map(x, torch.ones(10), 1).tolist() == [0]


# ------------------------------------------------------------------------------ greedy vs brute force


@pytest.mark.parametrize("seed", range(6))
def test_greedy_equals_brute_force_logdet_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    n = 6 + seed
    x = torch.randn(n, n + 8, generator=g)
    q = 0.5 + torch.rand(n, generator=g)
    for k in (1, 2, n // 2, n - 1):
        assert greedy_dpp_map(x, q, k).tolist() == _brute_force_greedy(x, q, k)


@pytest.mark.parametrize("theta", [None, 0.5, 0.8])
@pytest.mark.parametrize("negate", [True, False])
def test_method_equals_brute_force_with_instruction(theta, negate):
    g = torch.Generator().manual_seed(7)
    n, d = 9, 16
    x, t = torch.randn(n, d, generator=g), torch.randn(4, d, generator=g)
    # relevance recomputed here in float64 from the formula, independently of the library
    s = (F.normalize(x.double(), dim=-1) @ F.normalize(t.double(), dim=-1).T).mean(1)
    s = -s if negate else s
    r = (s - s.min() + 1e-6) / (s.max() - s.min() + 1e-6)
    q = r if theta is None else torch.exp(theta / (2 * (1 - theta)) * r)
    k = 4 if theta is None else 6  # with theta=None the least relevant token has q ~ 1e-6
    keep = CDPruner(theta=theta, negate_relevance=negate).select(_image(x, t), k).keep
    assert keep.tolist() == sorted(_brute_force_greedy(x, q, k))


# ---------------------------------------------------------------------------------------- contract


def test_exactly_k_sorted_distinct_for_many_shapes():
    g = torch.Generator().manual_seed(3)
    for n in (2, 3, 5, 17, 64, 150):
        for d in (1, 4, 32):
            x = torch.randn(n, d, generator=g)
            t = torch.randn(3, d, generator=g)
            ks = sorted({1, 2, n // 3, n // 2, n - 1} - {0})
            for k in ks:
                for method in (CDPruner(), CDPruner(theta=0.5)):
                    assert_valid_keep(method.select(_image(x, t), k).keep, n, k)
                assert_valid_keep(CDPruner().select(_image(x), k).keep, n, k)


def test_degenerate_inputs_fall_back_to_relevance():
    # all tokens identical: the DPP has rank 1, the rest are the most relevant remaining tokens
    x = torch.ones(10, 4)
    keep = CDPruner().select(_image(x), 5).keep
    assert keep.tolist() == [0, 1, 2, 3, 4]  # uniform relevance: ties towards the lower index
    # zero tokens and rank-deficient features (d=2 < k)
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    x[3] = 0
    t = torch.randn(2, 2, generator=torch.Generator().manual_seed(1))
    keep = CDPruner().select(_image(x, t), 8).keep
    assert_valid_keep(keep, 12, 8)
    # after the DPP runs out of rank, the remaining picks follow relevance
    q = CDPruner().quality(_image(x, t))
    chosen = greedy_dpp_map(x, q, 8)
    tail = chosen[2:].tolist()
    assert [q[i].item() for i in tail] == sorted((q[i].item() for i in tail), reverse=True)


def test_bf16_input():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 16, generator=g).bfloat16()
    t = torch.randn(5, 16, generator=g).bfloat16()
    keep = CDPruner().select(_image(x, t), 10).keep
    assert_valid_keep(keep, 40, 10)
    assert torch.equal(keep, CDPruner().select(_image(x.float(), t.float()), 10).keep)
    assert CDPruner().quality(_image(x, t)).dtype == torch.float32


def test_precomputed_similarity_and_on_the_fly_rows_agree(monkeypatch):
    from tokprune.methods import cdpruner

    g = torch.Generator().manual_seed(3)
    x, q = torch.randn(200, 48, generator=g), torch.rand(200, generator=g)
    with_gram = cdpruner.greedy_dpp_map(x, q, 40)
    monkeypatch.setattr(cdpruner, "GRAM_LIMIT", 0)
    assert torch.equal(cdpruner.greedy_dpp_map(x, q, 40), with_gram)


# ------------------------------------------------------------------------------------------- units


def _tiled(seed: int = 4, sizes=(12, 12, 12)) -> ImageTokens:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    units = [
        Unit(index=torch.arange(s, s + m), grid=None, kind="base" if i == 0 else "tile")
        for i, (s, m) in enumerate(zip(starts, sizes))
    ]
    image = _image(torch.randn(n, 16, generator=g), torch.randn(3, 16, generator=g))
    image.units = units
    return image


def test_per_unit_runs_one_dpp_per_unit_with_image_wide_relevance():
    image = _tiled()
    q = CDPruner().quality(image)  # normalised over all 36 tokens
    keep = CDPruner().select(image, 9).keep
    assert_valid_keep(keep, 36, 9)
    expected = []
    for unit in image.units:
        chosen = greedy_dpp_map(image.embeds[unit.index], q[unit.index], 3)
        expected += unit.index[chosen].tolist()
    assert keep.tolist() == sorted(expected)
    for unit in image.units:  # equal units, equal counts
        assert int(torch.isin(keep, unit.index).sum()) == 3


def test_per_unit_splits_the_budget_by_unit_size_and_joint_is_one_dpp():
    image = _tiled(sizes=(6, 12, 18))
    keep = CDPruner().select(image, 12).keep
    assert [int(torch.isin(keep, u.index).sum()) for u in image.units] == [2, 4, 6]
    joint = CDPruner(units="joint").select(image, 12).keep
    expected = greedy_dpp_map(image.embeds, CDPruner().quality(image), 12).sort().values
    assert torch.equal(joint, expected)
    # a plain image (no units) is the same under both
    plain = _image(image.embeds, image.text["embeds"])
    assert torch.equal(CDPruner().select(plain, 12).keep, CDPruner(units="joint").select(plain, 12).keep)
