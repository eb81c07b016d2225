"""Test-only reading of PyramidDrop's released selection (LLaVA-1.5 inference), written from the authors'
code (not copied).

Source: github.com/Cooperx521/PyramidDrop at commit 6444f304aee4b7edcb022839fb9e8cd07859704a:
  * `llava/model/modeling_llama_pdrop.py`, `LlamaModel.pdrop_forward` (the layer loop: after decoder
    layer idx runs, `rank_layer = idx + 1`; if it is in `layer_list` and the step is a prefill, call
    `pdrop_rank_drop`; decode steps only shift their position ids) and `LlamaModel.pdrop_rank_drop`;
  * `llava/model/llava_arch.py`, `prepare_inputs_labels_for_multimodal_pdrop` (records `image_token_posi`,
    the first image placeholder's index, `prompt_len`, the prompt's text tokens, and `image_tokens`);
  * `llava/eval/model_vqa_loader.py` and `scripts/v1_5/pdrop_eval/*.sh`: `layer_list [8,16,24]`,
    `image_token_ratio_list [0.5,0.25,0.125]`, with 1.0 put in front (ratios of the *original* count).

What `pdrop_rank_drop` does at a boundary b (the hidden states entering layer b, batch 1, inference), in
words:
  * the image holds `int(N * ratio_list[s])` tokens now and keeps `int(N * ratio_list[s + 1])` (floor,
    N = the image's original token count);
  * layer b's `input_layernorm` on the hidden states, layer b's q_proj / k_proj, RoPE at the *current*
    position ids (the rotary tables of layer b's attention);
  * the query is the token at `prompt_len + image_tokens - 1`: the last token of the (unpadded) sequence,
    i.e. the last instruction token of a prefill; its scores q k^T / sqrt(d) plus the causal mask row,
    softmax in float32 (cast back to the model's dtype), mean over the heads, the entries at the image span;
  * the top `keep_length` (torch.topk), sorted, plus everything before and after the span; the kept
    sequence is *renumbered*: position ids 0 .. L' - 1 for the layers after the drop (and decode steps
    shift theirs by the dropped count), a new mask from the kept 2-D mask.
Generalised: LLaVA-1.5 has no grouped-query attention (the code multiplies q by k directly); here the
keys are repeated over the query groups (what the attention itself does). `positions="original"` is
tokprune's reading of the same selection with every token's original position kept (a variant of this
reference, not of the code).
"""

from __future__ import annotations

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from agreement.llm_steps import LayerView


def code_counts(n: int, ratios: tuple[float, ...] = (0.5, 0.25, 0.125)) -> list[int]:
    """The image's kept count after each stage: int(n * r) for the code's `image_token_ratio_list`."""
    return [int(n * r) for r in ratios]


def boundary_row(lm, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(L,) head-mean attention of the last token over all tokens, from layer `layer`'s own input norm,
    q/k projections and RoPE at `positions` (1, L); hidden: (1, L, D) the stream entering that layer."""
    block = lm.layers[layer]
    attn = block.self_attn
    normed = block.input_layernorm(hidden)
    length, d = normed.shape[1], attn.head_dim
    q = attn.q_proj(normed).view(1, length, -1, d).transpose(1, 2)
    k = attn.k_proj(normed).view(1, length, -1, d).transpose(1, 2)
    cos, sin = lm.rotary_emb(hidden, position_ids=positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = q[:, :, -1:] @ k.transpose(-1, -2) / math.sqrt(d)  # (1, H, 1, L): the last row sees every key
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return weights.mean(dim=1)[0, 0]


def pdrop_step(
    lm, layers: tuple[int, ...], spans: list[tuple[int, int]], counts: list[int], found: dict,
    positions: str = "contiguous",
):  # fmt: skip
    """A `stepwise_logits` step running the code's rank & drop before each boundary layer of `layers`.

    spans: (start, length) of every image in the input (each ranked on its own span with the same counts,
    one per stage); found["kept"]: per stage, per image, the kept tokens' input indices (sorted).
    positions: "contiguous" renumbers the kept sequence 0, 1, ... as the code does (written into the
    view's position ids before the loop gathers them), "original" keeps every token's own position.
    """
    found.setdefault("kept", [])

    def step(view: LayerView):
        if view.layer not in layers:
            return None
        stage = layers.index(view.layer)
        row = boundary_row(lm, view.layer, view.hidden, view.position_ids)
        origin = view.origin[0]
        keep = torch.ones(view.hidden.shape[1], dtype=torch.bool)
        kept_now = []
        for start, n in spans:
            present = ((origin >= start) & (origin < start + n)).nonzero().squeeze(1)  # current indices
            top = row[present].topk(counts[stage]).indices.sort().values
            keep[present] = False
            keep[present[top]] = True
            kept_now.append(origin[present[top]])
        found["kept"].append(kept_now)
        if positions == "contiguous":
            view.position_ids[0, keep] = torch.arange(int(keep.sum()), device=view.position_ids.device)
        return keep[None]

    return step
