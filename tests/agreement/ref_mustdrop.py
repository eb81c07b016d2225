"""Test-only reading of MustDrop's released pipeline (LLaVA-1.5), written from the authors' code (not copied).

Source: github.com/liuting20/MustDrop, commit 909afa538bff22e10c02db2da101aa1870e21912:
  * `llava/model/multimodal_encoder/clip_encoder.py`, `CLIPVisionModelAcc.custom_forward`: after encoder
    layer 0, `local_merge.conditional_pooling(hidden, 0.8, (3, 3))` merges windows and the remaining layers
    run on the merged sequence; after the last layer (index 23) the key set = the top ceil(0.08 * (N - 1))
    patches by head-mean [CLS] attention of that layer (N - 1 the patches left);
  * `llava/model/multimodal_encoder/local_merge.py`, `conditional_pooling`: a 3 x 3 window's score = the
    sum of its cells' pairwise cosine similarities without the diagonal over 9 * 8; every window scoring
    >= the threshold merges into one token (merged windows first, then the other patches in order);
  * `llava/model/language_model/modelling_sparse_llama.py`, `LlamaDynamicvitModel.forward` (after each
    layer in `pruning_layers` = [2, 6, 10, 14] has run, `dual_attention_filter` on that layer's attention
    map, the key set added back, `torch.unique` (ascending), the sequence rebuilt as prefix, kept image
    tokens, text, and the position ids cut to the first L' values, i.e. renumbered 0, 1, 2, ...) and
    `dual_attention_filter`;
  * `scripts/v1_5/eval/textvqa_{192,128,64}.sh`: (global_thr, individual_thr) = (0.001, 0.001),
    (0.0012, 0.001), (0.011, 0.01).

`dual_attention_filter` in words: the attention map's rows of every token after the image (all of them, to
the end of the prompt), columns of the image tokens, averaged over the heads: global = the sum over the
rows, individual = the maximum; a token is dropped when global < global_thr * (sum of all globals) and
individual < individual_thr, i.e. kept when either reaches its threshold.

This reference covers the inputs of the agreement tests, on which the vision stage merges nothing (no
window reaches 0.8 after CLIP's first layer; `merges_nothing` checks it), so CLIP runs unchanged and the
key set is read from the captured last-layer attention; a merging image would need CLIP re-run on the
merged sequence (not written here). Generalised: the tiny LLM has 4 layers, so of the filter layers only
layer 2 exists; the image span and the grid are read from the case.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from agreement.llm_steps import LayerView

RELEASED = {"192": (0.001, 0.001), "128": (0.0012, 0.001), "64": (0.011, 0.01)}
FILTER_LAYERS = (2, 6, 10, 14)


def merges_nothing(vision, image: int = 0, window: int = 3, threshold: float = 0.8) -> bool:
    """Whether the code's local merge after CLIP layer 0 finds no window at or above `threshold`."""
    patches = vision.hidden_states[1][image, 1:]
    side = math.isqrt(patches.shape[0])
    cells = patches.view(side // window, window, side // window, window, -1).permute(0, 2, 1, 3, 4)
    unit = F.normalize(cells.reshape(-1, window * window, patches.shape[-1]).float(), dim=-1)
    pairs = unit @ unit.transpose(1, 2)
    count = window * window
    score = (pairs.sum((1, 2)) - pairs.diagonal(dim1=1, dim2=2).sum(1)) / (count * (count - 1))
    return bool((score < threshold).all())


def key_set(vision, image: int = 0, ratio: float = 0.08) -> list[int]:
    """The code's key patches (patch indices): top ceil(ratio * patches) by head-mean [CLS] attention of
    the last ViT layer."""
    row = vision.attentions[-1][image][:, 0, 1:].float().mean(0)
    return row.topk(math.ceil(ratio * row.numel())).indices.tolist()


def dual_attention(attention: torch.Tensor, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(global (n,), individual (n,)) from one layer's map (H, L, L): the rows after the image span."""
    rows = attention[:, start + n :, start : start + n].float().mean(0)  # (text, n)
    return rows.sum(0), rows.amax(0)


def filter_kept(
    global_: torch.Tensor, individual: torch.Tensor, keys: list[int], thresholds: tuple[float, float]
) -> list[int]:
    """The code's kept image tokens (sorted indices into the span): either attention at its threshold, or
    a key."""
    g_thr, i_thr = thresholds
    dropped = (global_ < global_.sum() * g_thr) & (individual < i_thr)
    return sorted(set((~dropped).nonzero().squeeze(1).tolist()) | set(keys))


def matched_thresholds(global_: torch.Tensor, individual: torch.Tensor, r: int) -> tuple[float, float]:
    """Thresholds under which each attention admits exactly its top r tokens (no ties on these inputs)."""
    g = float(global_.sort(descending=True).values[r - 1] / global_.sum())
    i = float(individual.sort(descending=True).values[r - 1])
    return g, i


def mustdrop_step(start: int, n: int, keys: list[int], thresholds, found: dict, renumber: bool = True):
    """A `stepwise_logits` step running the code's filter after every filter layer the LLM has (before
    layer f + 1); `thresholds` is a pair or a function (global, individual) -> pair. found["kept"]: the kept
    image tokens (indices into the original span) after each filter. renumber=False keeps the tokens'
    positions (tokprune's rule, `MustDrop` difference 4) instead of the code's 0, 1, 2, ..."""
    found["kept"] = []
    current = {"span": list(range(n)), "keys": list(keys)}

    def step(view: LayerView):
        if view.layer - 1 not in FILTER_LAYERS:
            return None
        m = len(current["span"])
        global_, individual = dual_attention(view.attention[0], start, m)
        pair = thresholds(global_, individual) if callable(thresholds) else thresholds
        local_keys = [i for i, token in enumerate(current["span"]) if token in set(current["keys"])]
        kept = filter_kept(global_, individual, local_keys, pair)
        current["span"] = [current["span"][i] for i in kept]
        found["kept"].append(list(current["span"]))
        length = view.hidden.shape[1]
        keep = torch.ones(length, dtype=torch.bool)
        keep[start : start + m] = False
        keep[[start + i for i in kept]] = True
        if renumber:
            view.position_ids[0, keep] = torch.arange(int(keep.sum()))  # renumbered once gathered
        return keep[None]

    return step
