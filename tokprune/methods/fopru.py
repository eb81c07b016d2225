"""FoPru: focal pruning by ViT significance (pre-softmax logit means), "rank" (global top-k) or "row" (grid rows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection, topk_sorted, trivial_selection
from tokprune.methods.options import check_choice

_STRATEGIES = ("rank", "row")
_SCORES = ("logits", "attention")


def row_select(significance: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """The "row" strategy on an h x w grid (row-major): exactly k sorted indices, 0 < k <= h * w.

    Row significance = sum of its tokens' significance. The q = k // w rows with the highest row
    significance are kept whole (ties: upper row first). The remaining k - q * w tokens (< w) come from the
    next-ranked row as one contiguous run: the window of that length with the largest summed
    significance (ties: leftmost), so the partial row is still a contiguous strip of the image.
    """
    h, w = grid
    sig = significance.float().reshape(h, w)
    ranked = torch.sort(sig.sum(1), descending=True, stable=True).indices
    full, rest = divmod(k, w)
    rows = ranked[:full]
    device = significance.device
    cols = torch.arange(w, device=device)
    keep = [(rows[:, None] * w + cols).flatten()]
    if rest:
        row = ranked[full]
        windows = sig[row].unfold(0, rest, 1).sum(1)  # (w - rest + 1,) sums of every run of `rest`
        start = torch.sort(windows, descending=True, stable=True).indices[0]
        keep.append(row * w + start + torch.arange(rest, device=device))
    return torch.cat(keep).sort().values


def significance(image: ImageTokens, score: str) -> torch.Tensor:
    """(n,) float32 token significance for `score` (see FoPru): "logits": the column mean or the row mean
    of the pre-softmax logits, whichever has the larger variance over the image's tokens (torch.var; ties
    to the row mean, as `s1 if var(s1) > var(s2) else s2` does); "attention": the received attention."""
    if score == "attention":
        return image.signals["received_attention"].float()
    column = image.signals["logit_column_mean"].float()
    row = image.signals["logit_row_mean"].float()
    return column if torch.var(column).item() > torch.var(row).item() else row


@dataclass
class FoPru(Method):
    """FoPru — Jiang et al., "FoPru: Focal Pruning for Efficient Large Vision-Language Models",
    arXiv:2411.14164 (2024).

    The paper (its abstract; the method section could not be read here): a training-free pruning of the
    visual tokens before the LLM in three steps: (1) token significance, an attention-based score from
    the vision encoder; (2) pruning by "rank" (the tokens of highest significance over the whole image, a
    global view) or "row" (continuous image rows, a local view); (3) the kept tokens in their original
    order. No official release of the authors' code was found (searches of public code, issues and
    pages, 2026); the defaults follow the public implementation `focal_prunning` in
    github.com/dongxianzhe/hydrainfer (`hydrainfer/layer/token_prunning.py`, commit d4d5f4fe; its caller
    and scores at commit 0c5000e7, `dxz/model/llava.py` / `clip.py` / `layer/attention.py`), which is not
    the paper's own release: a number from it is "FoPru as implemented there" (tests/agreement/ref_fopru.py).

    Significance (`score`):
      * "logits" (default, that implementation): the head-mean *pre-softmax* logits q k^T / sqrt(d) of
        the layer whose output feeds the projector (LLaVA: CLIP layer -2; Qwen2.5-VL: the last
        full-attention block), over the patch tokens ([CLS] row and column left out): s1 = the column
        mean (the mean logit a token receives from the patches, signal "logit_column_mean"), s2 = the row
        mean (the mean logit it gives them, "logit_row_mean"); significance = s1 if var(s1) > var(s2)
        else s2, chosen once per image over the tokens ranked together;
      * "attention" (tokprune's earlier default): the attention each token *receives*, the column mean
        over all queries ([CLS] included) of the head-mean *softmax* map ("received_attention").
    Pruning (`strategy`):
      * "rank" (default; the only strategy that implementation's caller uses): the global top-k tokens by
        significance; on an AnyRes image (base view and tiles) or a video clip all its tiles / frames
        compete together;
      * "row": grid rows ranked by their summed significance, the best rows kept whole, filled to exactly
        k with a contiguous run from the next-ranked row (see `row_select`); rows belong to one grid, so
        on an AnyRes image or a clip "row" runs per tile / frame with the budget split by size
        (`spatial`). With k a multiple of the row width this is that implementation's deprecated
        `FocalPrunning(ratio, "row")` (floor(ratio x rows) whole rows).
    The kept tokens stay in their original order and keep their original positions (step 3). Without a
    grid (e.g. a [CLS] feature among the tokens) "row" falls back to "rank".

    Default budget: keep_ratio 0.25 (144 of 576 on LLaVA-1.5), the retention that summaries of the paper's
    results report as nearly lossless; the paper sweeps the ratio rather than fixing one.

    Deliberate differences from that implementation: (1) the logit means are computed from the layer's
    q/k in a hook, as (mean q) . k and q . (mean k) (DESIGN §5), not from the N x N map (the same numbers
    up to float rounding); (2) beyond LLaVA-1.5 (one ViT pass per image): the variance choice is made once
    per image over all the tokens ranked together (the implementation makes it per ViT pass, and knows no
    tiles), over the image's LLM tokens (on Qwen / InternVL / SmolVLM / Gemma 3 each the mean of the
    patches merged into it; towers without [CLS] average over all their tokens; on Qwen within each
    attention block); (3) "row" keeps exactly k tokens (the implementation's `focal_prunning` "row" branch
    slices k *rows* and cannot fill its k-token output; its deprecated module keeps floor(ratio x rows)
    whole rows), and rows are the adapter's (h, w) token grid, not a sqrt(n) x sqrt(n) square; (4) ties
    go to the lower index (the implementation's unstable sort leaves them unspecified).
    """

    name = "fopru"
    family = "ViT attention"
    default_budget = Budget(ratio=0.25)
    paper = "Jiang et al., arXiv:2411.14164 (FoPru)"
    code_families = ("llava",)  # the implementation followed runs LLaVA-1.5 (it is not the authors' release)
    strategy: str = "rank"
    score: str = "logits"

    def __post_init__(self) -> None:
        check_choice(self, "strategy", _STRATEGIES)
        check_choice(self, "score", _SCORES)

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.score == "attention":
            return ("received_attention",)
        return ("logit_column_mean", "logit_row_mean")

    @property
    def spatial(self) -> bool:  # type: ignore[override]
        """Only "row" needs a grid: it runs per AnyRes tile / video frame (budget split by unit size), while
        "rank" ranks every token of the image (all its tiles / frames) together."""
        return self.strategy == "row"

    def select(self, image: ImageTokens, k: int) -> Selection:
        if (trivial := trivial_selection(image, k)) is not None:
            return trivial
        sig = significance(image, self.score)
        if self.strategy == "row" and image.grid is not None:
            return Selection(keep=row_select(sig, image.grid, k))
        return Selection(keep=topk_sorted(sig, k))
