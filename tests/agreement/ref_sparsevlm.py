"""Test-only reading of SparseVLM's released v1.5 inference (LLaVA-1.5), written from the authors' code (not
copied).

Source: github.com/Gumpest/SparseVLMs, branch v1.5 at 734d9003879689713a132b83297dfad060a5c9af (its code is
that of tag v1.5, b9619e61a6f840d7aa9817eadd68bb5e84ce7b95, last changed in 535f8baef705733d3758dea6e3fb2ad367b0f869;
the README of the main branch presents v1.5 as SparseVLM and links this branch):
  * `llava/model/language_model/modelling_sparse_llama.py`, `LlamaDynamicvitModel.forward` (the layer loop:
    the raters from `inputs_embeds` before layer 0; at `layer_idx in pruning_loc = [2, 6, 15]` in a prefill,
    the layer runs, its attention map scores the visual tokens, the layer's *output* is pruned and recycled,
    `position_ids` truncated to the new length) and `LlamaDynamicvitFlashAttention2.forward` (with
    `return_logits`: softmax(q k^T / sqrt(d) + causal) over all keys, per head);
  * `llava/model/language_model/score.py`, `attn_postprocess_topk` and `sparse_token_dict` (192: 300/200/110,
    128: 303/110/36, 64: 66/30/17);
  * `llava/model/language_model/utils.py`, `cluster_and_merge`.

In words, for one image of n tokens starting at sequence index s (batch 1):
  * raters (once, on the LLM input): V = the image's embeddings, T = every embedding after the image;
    m = softmax over T of V T^T (no scale), averaged over V; raters = the text tokens with m > mean(m)
    (their offsets from the image's end, which stay valid as the image shrinks);
  * at stage i, after scoring layer l_i: the layer's attention, head mean, rows = the raters, columns = the
    current visual block [s, s + v), averaged over the raters: v scores; keep the top min(K_i, v - 1);
  * recycling: of the N dropped tokens, the int(0.3 N) + 1 best-scored ones (the layer's output states), in
    that order, are clustered into c = int(r / 10) + 1: distances ||x_a - x_b|| / sqrt(D); density = exp(-mean
    squared distance to the c nearest, the token itself included) (+ 1e-6 noise in the code, left out here:
    ties go to the earlier token); delta = distance to the nearest denser token (the largest distance of
    all for the densest); centres = the c largest delta * density, in that order; each token joins its
    nearest centre; a cluster's state = sum x / (size + 1e-6);
  * the new sequence: the text before the image, the kept visual tokens in their order, the c cluster
    states (centre order), the text after; v becomes K_i + c; position ids 0 .. L' - 1.
Generalised: the layers (2, 6, 15 of 32) are given as parameters (the tiny 4-layer LLM: 0, 1, 2), and the
image span and token count are read from the case instead of the code's 576; the keys of a grouped-query
model are repeated over their query groups (the eager map already is). `layout="slots"` is tokprune's
layout of the same selection (the cluster token in its centre's slot, original positions and order), a
variant of this reference, not of the code.
"""

from __future__ import annotations

import torch

from agreement.llm_steps import LayerView

SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
EPS = 1e-6


def rater_offsets(lm_input: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Offsets (from the image's end) of the rating text tokens; lm_input (1, L, D) the unpruned LLM input."""
    image = lm_input[0, start : start + n].float()
    text = lm_input[0, start + n :].float()
    relation = torch.softmax(image @ text.T, dim=1).mean(dim=0)  # (m,)
    return torch.nonzero(relation > relation.mean()).flatten()


def block_scores(attention: torch.Tensor, rows: torch.Tensor, start: int, v: int) -> torch.Tensor:
    """(v,) mean over the rater rows of the head-mean map (1, H, L, L) at the visual block [start, start+v)."""
    head_mean = attention[0].float().mean(dim=0)
    return head_mean[rows][:, start : start + v].mean(dim=0)


def descending(values: torch.Tensor) -> torch.Tensor:
    """Indices of values, largest first, equal values in index order (torch.topk leaves ties open)."""
    return torch.sort(values, descending=True, stable=True).indices


def cluster_merge(tokens: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres (c,) rows of tokens (r, D) in the code's order, merged (c, D)) of the code's clustering."""
    r, width = tokens.shape
    x = tokens.float()
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1) / width**0.5  # (r, r)
    density = (-(dist.topk(c, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()
    biggest = dist.max()
    delta = torch.empty(r)
    order = torch.arange(r)
    for a in range(r):  # nearest denser token; an equal density counts as denser for the earlier token
        denser = (density > density[a]) | ((density == density[a]) & (order < a))
        delta[a] = dist[a, denser].min() if bool(denser.any()) else biggest
    centres = descending(delta * density)[:c]
    owner = dist[centres].argmin(dim=0)  # (r,) nearest centre, the earlier one on ties
    owner[centres] = torch.arange(c)
    merged = torch.zeros(c, width)
    for j in range(c):
        members = x[owner == j]
        merged[j] = (members / (members.shape[0] + EPS)).sum(dim=0)
    return centres, merged


def sparsevlm_step(
    lm_input: torch.Tensor,
    start: int,
    n: int,
    counts: tuple[int, ...],
    scoring_layers: tuple[int, ...],
    found: dict,
    layout: str = "code",
    recycle: bool = True,
):
    """A `stepwise_logits` step running the code's stage after each layer of `scoring_layers`.

    counts: the top-k count of each stage (`SCHEDULES`); layout: "code" (the code's sequence and
    positions) or "slots" (tokprune's, see the module docstring); recycle=False: no clusters (a variant).
    found["stages"]: per stage a dict of "top" (sorted ids of the kept tokens), "centres" (ids, cluster
    order), "merged" ((c, D), cluster order) and "kept" (sorted ids of the block after the stage). A token's
    id is its patch index; a cluster token takes its centre's (the slot tokprune puts it in).
    """
    raters = rater_offsets(lm_input, start, n)
    state = {"ids": torch.arange(n)}  # ids of the current visual block, in sequence order
    found["stages"] = []

    def step(view: LayerView):
        if view.layer - 1 not in scoring_layers:
            return None
        stage = scoring_layers.index(view.layer - 1)
        ids = state["ids"]
        v = ids.numel()
        scores = block_scores(view.attention, start + v + raters, start, v)
        k = min(counts[stage], v - 1)
        chosen = torch.zeros(v, dtype=torch.bool)
        chosen[descending(scores)[:k]] = True
        top = chosen.nonzero().flatten()  # block order
        dropped = (~chosen).nonzero().flatten()
        centre_rows, merged = torch.zeros(0, dtype=torch.long), torch.zeros(0, view.hidden.shape[-1])
        if recycle and dropped.numel():
            r = int(dropped.numel() * 0.3) + 1
            recycled = dropped[descending(scores[dropped])[:r]]
            centres, merged = cluster_merge(view.hidden[0, start + recycled], int(r / 10) + 1)
            centre_rows = recycled[centres]
        hidden = view.hidden.clone()
        hidden[0, start + centre_rows] = merged.to(hidden.dtype)
        if layout == "code":
            block = torch.cat([top, centre_rows])
        else:
            block = torch.cat([top, centre_rows]).sort().values
        length = view.hidden.shape[1]
        index = torch.cat([torch.arange(start), start + block, torch.arange(start + v, length)])
        if layout == "code":  # renumbered 0, 1, ... (written before the loop gathers the position ids)
            view.position_ids[0, index] = torch.arange(index.numel(), device=view.position_ids.device)
        state["ids"] = ids[block]
        found["stages"].append(
            {
                "top": ids[top].sort().values,
                "centres": ids[centre_rows],
                "merged": merged,
                "kept": ids[block].sort().values,
            }
        )
        return index[None], hidden

    return step
