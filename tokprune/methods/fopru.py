"""FoPru: focal pruning by ViT attention significance, "rank" (global top-k) or "row" (whole grid rows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection, topk_sorted, trivial_selection
from tokprune.methods.options import check_choice

_STRATEGIES = ("rank", "row")


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


@dataclass
class FoPru(Method):
    """FoPru — Jiang et al., "FoPru: Focal Pruning for Efficient Large Vision-Language Models",
    arXiv:2411.14164 (2024).

    What the paper specifies (its abstract; the method section itself could not be read here): a
    training-free pruning of the visual tokens before the LLM in three steps: (1) token significance, an
    attention-based score taken from the vision encoder; (2) pruning by one of two strategies, "rank"
    (keep the tokens with the highest significance over the whole image, a global view) or "row" (keep
    continuous image rows, preserving contiguous key information, a local view); (3) reordering the
    kept tokens back into their original positional order. A third-party summary adds that at 25 %
    retention the accuracy stays within about 1 point on several benchmarks. The exact significance
    formula, the vision layer, how a row is ranked and how many rows are kept are not in the text reached
    here; they come from a public implementation (`focal_prunning` in the dongxianzhe/hydrainfer
    repository, not the paper's official release), read only to understand these details.

    Here: token significance = the attention each visual token *receives* at the layer whose output feeds
    the projector (LLaVA: CLIP layer -2; Qwen2.5-VL: the last full-attention block), i.e. the column mean
    over query tokens of the head-averaged softmax map ("received_attention"), as in that implementation.
      * "rank" (default): the global top-k tokens by significance, over the whole image: on an AnyRes
        image (base view and tiles) or a video clip, all its tiles / frames compete together;
      * "row": grid rows ranked by row significance = the sum of their tokens' significance (as in that
        implementation), the best rows kept whole, filled to exactly k with a contiguous run from the
        next-ranked row (see `row_select`). Rows belong to one grid, so on an AnyRes image or a clip
        "row" runs on each tile / frame with the budget split by their sizes (`spatial`).
    Either way the kept tokens stay in their original order (step 3) and keep their original positions.
    Without a grid (e.g. a [CLS] feature among the tokens) "row" falls back to "rank".

    Default budget: keep_ratio 0.25 (144 of 576 on LLaVA-1.5), the retention that the summary of the
    paper's results reports as nearly lossless; the paper sweeps the ratio rather than fixing one.

    Deliberate differences / choices: (1) significance is recomputed from the layer's q/k in a hook
    (DESIGN §5) instead of reading eager attention maps; (2) the column mean runs over all queries of the
    layer, [CLS] included, where that implementation averages over the patch queries only (and falls
    back to the row mean, the attention a token pays to the other patches, when that has the larger
    variance; not reproduced); (3) the budget is an exact token count k for both strategies: that
    implementation's "row" keeps whole rows only (floor(ratio x rows) of them in its ratio-based
    version, so fewer than k tokens when k is not a multiple of the row width), here the rest is the
    stated contiguous run; (4) rows are the adapter's (h, w) token grid, not a sqrt(n) x sqrt(n) square;
    (5) on Qwen the received attention is the mean over the 2x2 patches merged into one LLM token
    (adapter behaviour).
    """

    name = "fopru"
    family = "ViT attention"
    signals = ("received_attention",)
    default_budget = Budget(ratio=0.25)
    paper = "Jiang et al., arXiv:2411.14164 (FoPru)"
    strategy: str = "rank"

    def __post_init__(self) -> None:
        check_choice(self, "strategy", _STRATEGIES)

    @property
    def spatial(self) -> bool:  # type: ignore[override]
        """Only "row" needs a grid: it runs per AnyRes tile / video frame (budget split by unit size), while
        "rank" ranks every token of the image (all its tiles / frames) together."""
        return self.strategy == "row"

    def select(self, image: ImageTokens, k: int) -> Selection:
        if (trivial := trivial_selection(image, k)) is not None:
            return trivial
        significance = image.signals["received_attention"]
        if self.strategy == "row" and image.grid is not None:
            return Selection(keep=row_select(significance, image.grid, k))
        return Selection(keep=topk_sorted(significance, k))
