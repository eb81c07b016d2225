"""Unit tests of FoPru (tokprune/methods/fopru.py) against brute-force Python references."""

from __future__ import annotations

import pytest
import torch

import tokprune
from tokprune.core.budget import Budget
from tokprune.core.layout import Unit
from tokprune.core.selection import select_units
from tokprune.errors import MethodOptionError
from tokprune.methods.base import ImageTokens
from tokprune.methods.fopru import FoPru, significance


def _image(h: int, w: int, seed: int = 0, grid: bool = True) -> ImageTokens:
    g = torch.Generator().manual_seed(seed)
    n = h * w
    significance = torch.rand(n, generator=g) ** 2
    return ImageTokens(
        embeds=torch.randn(n, 4, generator=g),
        grid=(h, w) if grid else None,
        signals=_signals(significance / significance.sum(), seed),
    )


def _signals(sig: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Signals whose significance is `sig` for both scores: the column mean of the logits is `sig`, the row
    mean varies far less (so the code's rule picks the column mean, also on any part of the image), the
    received attention is `sig` too."""
    noise = torch.rand(sig.numel(), generator=torch.Generator().manual_seed(seed + 100))
    row = sig.mean() + 1e-3 * (noise - noise.mean()) * sig.std() / noise.std().clamp_min(1e-12)
    return {"logit_column_mean": sig, "logit_row_mean": row, "received_attention": sig}


def _sig(image: ImageTokens) -> torch.Tensor:
    return image.signals["logit_column_mean"]


def _ref_rank(sig: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(sig)), key=lambda i: (-sig[i], i))[:k])


def _ref_row(sig: list[float], h: int, w: int, k: int) -> list[int]:
    row_sum = [sum(sig[r * w : (r + 1) * w]) for r in range(h)]
    ranked = sorted(range(h), key=lambda r: (-row_sum[r], r))
    full, rest = divmod(k, w)
    keep = [r * w + c for r in ranked[:full] for c in range(w)]
    if rest:
        r = ranked[full]
        starts = range(w - rest + 1)
        best = max(starts, key=lambda s: (sum(sig[r * w + s : r * w + s + rest]), -s))
        keep += [r * w + best + c for c in range(rest)]
    return sorted(keep)


def _assert_valid(keep: torch.Tensor, n: int, k: int) -> None:
    assert keep.dtype == torch.long and keep.shape == (k,)
    values = keep.tolist()
    assert values == sorted(set(values)) and all(0 <= v < n for v in values)


@pytest.mark.parametrize(
    ("h", "w", "k", "seed"), [(6, 6, 9, 0), (24, 24, 144, 1), (4, 7, 27, 2), (5, 3, 1, 3)]
)
def test_rank_is_global_topk(h, w, k, seed):
    image = _image(h, w, seed)
    keep = FoPru().select(image, k).keep
    _assert_valid(keep, h * w, k)
    assert keep.tolist() == _ref_rank(_sig(image).tolist(), k)


@pytest.mark.parametrize(
    ("h", "w", "rows", "seed"), [(6, 6, 2, 0), (24, 24, 6, 1), (4, 7, 3, 2), (5, 3, 1, 3)]
)
def test_row_keeps_whole_best_rows(h, w, rows, seed):
    image = _image(h, w, seed)
    k = rows * w
    keep = FoPru(strategy="row").select(image, k).keep
    _assert_valid(keep, h * w, k)
    sig = _sig(image).view(h, w).sum(1)
    best_rows = sorted(torch.sort(sig, descending=True).indices[:rows].tolist())
    assert keep.tolist() == [r * w + c for r in best_rows for c in range(w)]
    assert keep.tolist() == _ref_row(_sig(image).tolist(), h, w, k)


@pytest.mark.parametrize(
    ("h", "w", "k", "seed"), [(6, 6, 8, 0), (24, 24, 64, 1), (4, 7, 5, 2), (5, 3, 14, 3)]
)
def test_row_fills_to_exactly_k(h, w, k, seed):
    image = _image(h, w, seed)
    keep = FoPru(strategy="row").select(image, k).keep
    _assert_valid(keep, h * w, k)
    assert keep.tolist() == _ref_row(_sig(image).tolist(), h, w, k)
    # whole rows plus one contiguous run in a single other row
    rows = {}
    for i in keep.tolist():
        rows.setdefault(i // w, []).append(i % w)
    partial = [cols for cols in rows.values() if len(cols) < w]
    assert len(partial) == (1 if k % w else 0)
    if partial:
        cols = partial[0]
        assert cols == list(range(cols[0], cols[0] + len(cols)))


def test_row_hand_made():
    # 3 x 4 grid: row 2 strongest, then row 0 (sum 1.4), then row 1 (one strong token, sum 0.8);
    # in row 0 the best run of 2 is columns 1-2
    sig = torch.tensor([[0.1, 0.5, 0.6, 0.2], [0.0, 0.8, 0.0, 0.0], [0.9, 0.9, 0.9, 0.9]]).flatten()
    image = ImageTokens(embeds=torch.zeros(12, 2), grid=(3, 4), signals=_signals(sig))
    assert FoPru(strategy="row").select(image, 4).keep.tolist() == [8, 9, 10, 11]
    assert FoPru(strategy="row").select(image, 6).keep.tolist() == [1, 2, 8, 9, 10, 11]
    assert FoPru(strategy="row").select(image, 8).keep.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert FoPru(strategy="row").select(image, 5).keep.tolist() == [2, 8, 9, 10, 11]
    assert FoPru(strategy="rank").select(image, 6).keep.tolist() == [2, 5, 8, 9, 10, 11]


def test_row_without_grid_falls_back_to_rank():
    image = _image(4, 5, seed=5, grid=False)
    keep = FoPru(strategy="row").select(image, 7).keep
    assert keep.tolist() == _ref_rank(_sig(image).tolist(), 7)


def test_nothing_to_prune_passes_through():
    image = _image(3, 3)
    assert FoPru(strategy="row").select(image, 9).keep.tolist() == list(range(9))


@pytest.mark.parametrize("strategy", ["rows", "", "RANK", None])
def test_invalid_strategy_raises(strategy):
    with pytest.raises(MethodOptionError, match="strategy"):
        FoPru(strategy=strategy)


@pytest.mark.parametrize("score", ["logit", "Logits", "received_attention", None, 1])
def test_invalid_score_raises(score):
    with pytest.raises(MethodOptionError, match="score must be one of \\('logits', 'attention'\\)"):
        FoPru(score=score)


def test_class_attributes():
    assert FoPru.name == "fopru" and FoPru.where == "pre"
    assert FoPru().signals == ("logit_column_mean", "logit_row_mean")
    assert FoPru(score="attention").signals == ("received_attention",)
    assert FoPru.default_budget == Budget(ratio=0.25)
    assert (FoPru().strategy, FoPru().score) == ("rank", "logits")


def test_significance_is_the_logit_mean_of_larger_variance():
    """The code's rule: the column mean if var(column) > var(row), else (ties too) the row mean."""
    column = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])  # var 0.3
    row = torch.tensor([3.0, 2.0, 2.0, 0.0, 3.0, 2.0])  # var 1.2: picked
    image = ImageTokens(
        embeds=torch.zeros(6, 2),
        grid=(2, 3),
        signals={"logit_column_mean": column, "logit_row_mean": row, "received_attention": column},
    )
    assert torch.equal(significance(image, "logits"), row)
    assert FoPru().select(image, 3).keep.tolist() == [0, 1, 4]
    assert FoPru(score="attention").select(image, 3).keep.tolist() == [1, 3, 5]
    image.signals["logit_row_mean"] = column + 5.0  # equal variance: the row mean
    assert torch.equal(significance(image, "logits"), column + 5.0)
    image.signals["logit_row_mean"] = column * 0.5  # smaller variance: the column mean
    assert torch.equal(significance(image, "logits"), column)


def _two_frames(seed: int = 0) -> ImageTokens:
    """Two 4 x 5 units (video frames) whose significance is all in the first: a per-unit split would keep
    half of k in each."""
    image = _image(8, 5, seed, grid=False)
    sig = _sig(image).clone()
    sig[:20] += 1.0
    image.signals = _signals(sig, seed)
    image.units = [Unit(torch.arange(20), (4, 5), "frame"), Unit(torch.arange(20, 40), (4, 5), "frame")]
    return image


@pytest.mark.parametrize("k", [3, 10, 16])
def test_rank_is_global_over_tiles_and_frames(k):
    """ "rank" ranks every token of the image together: the engine does not split it by unit."""
    image = _two_frames()
    assert not FoPru().spatial
    keep = select_units(FoPru(), image, k).keep
    assert keep.tolist() == _ref_rank(_sig(image).tolist(), k)
    assert bool((keep < 20).all())


@pytest.mark.parametrize("k", [5, 10, 13])
def test_row_runs_per_unit_with_the_size_split(k):
    """ "row" needs a grid: each unit keeps its share (sizes split k) as rows of its own grid."""
    image = _two_frames(1)
    assert FoPru(strategy="row").spatial
    keep = select_units(FoPru(strategy="row"), image, k).keep
    sig = _sig(image).tolist()
    shares = [(k + 1) // 2, k // 2]  # equal sizes: the first unit takes the odd token
    expected = _ref_row(sig[:20], 4, 5, shares[0]) + [20 + i for i in _ref_row(sig[20:], 4, 5, shares[1])]
    assert keep.tolist() == expected


def test_rank_on_anyres_images_in_the_engine(tiny, monkeypatch):
    """LLaVA-NeXT (base view + tiles): with "rank" the kept set of an image is its global top-k by the
    signal, whatever tile the tokens sit in."""
    from tiny_models import batch_inputs

    model, proc = tiny("llava_next", "sdpa")
    seen = []
    original = FoPru.select

    def record(self, image, k):
        selection = original(self, image, k)
        seen.append((significance(image, "logits"), len(image.units or ()), k, selection.keep))
        return selection

    monkeypatch.setattr(FoPru, "select", record)
    with tokprune.apply(model, "fopru", keep_ratio=0.25), torch.no_grad():
        model(**batch_inputs("llava_next", proc, (1,), sizes=((224, 224),)))
    [(sig, units, k, keep)] = seen  # one call for the whole image
    assert units > 2
    assert keep.tolist() == _ref_rank(sig.tolist(), k)
