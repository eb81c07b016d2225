"""Test-only reading of VisionDrop's released pipeline (LLaVA-1.5), written from the authors' code (not copied).

Source: github.com/Ruixxxx/VisionDrop, commit f7a944497d581aa79570f8f79e8ca91b5347a52f:
  * `llava/visionzip/clip_encoder.py` (`CLIPVisionTower_VisionZip.forward`), `utils.py`, `main.py`
    (`visionzip(model, dominant, contextual)`: `dominant - 1` patches besides [CLS]): the pre-LLM step, a
    copy of VisionZip's, so `ref_visionzip.visionzip_pass` is its reading too;
  * `llava/eval_visiondrop/model_vqa_loader.py` and `scripts/v1_5/visiondrop_eval/*.sh`: dominant 42,
    contextual 6, `layer_list` [8, 16, 24], `image_token_list` [[30, 5], [22, 4], [16, 3]];
  * `llava/model/modeling_llama_visiondrop.py`: `LlamaModel.visiondrop_forward` (after decoder layer
    b - 1 has run, for b in `layer_list`, `visiondrop_rank_drop` shortens the sequence; the kept sequence
    is numbered 0, 1, 2, ... again) and `visiondrop_rank_drop`.

What `visiondrop_rank_drop` does at boundary b (batch 1, the image span at `start`, m visual tokens, the
stage's (dominant d, contextual c)), in words: layer b's input norm, q_proj and k_proj on the current
sequence, RoPE at the current position ids; the visual rows of the causal softmax (float32) of q k^T /
sqrt(head_dim), averaged over the heads, restricted to the visual columns and averaged over the visual
rows, score the visual tokens; the top d are dominant (kept in sequence order); the other visual tokens,
in sequence order, give c targets at 0, s, 2s, ... (s = max(1, rest // c)); every other one joins the
target whose head-mean post-RoPE key (mean over the KV heads) has the highest cosine similarity; a target
becomes its hidden state plus the mean of the absorbed hidden states; the sequence becomes prefix,
dominant tokens, contextual tokens, text.
Generalised: the boundaries and the depth are the caller's (the tiny LLM has 4 layers: 1, 2, 3, as
tokprune scales 8, 16, 24 of 32); with grouped KV heads each query head reads its group's key head (the
code's matmul assumes as many KV heads as query heads, as LLaVA-1.5's Vicuna has).
"""

from __future__ import annotations

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from agreement.llm_steps import LayerView
from agreement.ref_visionzip import visionzip_pass

PRE = (42, 6)
STAGES = ((30, 5), (22, 4), (16, 3))


def visiondrop_pre(vision, image: int = 0) -> tuple[list[int], torch.Tensor]:
    """The pre-LLM step on one image: (emitted ViT token indices, [CLS] = 0; (48, C) features)."""
    return visionzip_pass(
        vision.attentions[-2][image], vision.hidden_states[-2][image], vision.keys[-2][image], vision.heads,
        PRE[0], PRE[1],
    )  # fmt: skip


def llm_input(case, features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The code's LLM input for a one-image case: (1, L', D) prefix, projected features, text; and the
    image's start."""
    visual = case.visual[0].nonzero().squeeze(1)
    first, last = int(visual[0]), int(visual[-1])
    projected = case.model.model.multi_modal_projector(features)
    embeds = torch.cat([case.lm_input[0, :first], projected, case.lm_input[0, last + 1 :]])
    return embeds[None], first


def rank_drop(
    layer, rotary, view: LayerView, start: int, m: int, dominant: int, contextual: int, code: bool = True
):
    """One in-LLM stage: (order (L',) long: the current tokens the new sequence holds, in its order; hidden
    (1, L, D) with the contextual rows written at their targets; the kept span tokens in new order).

    code=False: tokprune's documented deviations instead (`VisionDrop`, differences 1 and 2): the metric is
    the KV heads' keys concatenated, and the kept tokens stay in sequence order."""
    hidden = view.hidden
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    b, length, _ = normed.shape
    d = attn.head_dim
    q = attn.q_proj(normed).view(b, length, -1, d).transpose(1, 2)
    k = attn.k_proj(normed).view(b, length, -1, d).transpose(1, 2)
    cos, sin = rotary(hidden, position_ids=view.position_ids)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k = q[0], k[0]  # (H, L, d), (H_kv, L, d)
    grouped = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    rows = q[:, start : start + m] @ grouped.transpose(1, 2) / math.sqrt(d)  # (H, m, L)
    causal = torch.arange(length)[None, :] > torch.arange(start, start + m)[:, None]
    probs = rows.float().masked_fill(causal, float("-inf")).softmax(-1)
    score = probs.mean(0)[:, start : start + m].mean(0)  # (m,)
    top = score.topk(dominant).indices
    is_dominant = torch.zeros(m, dtype=torch.bool)
    is_dominant[top] = True
    dominant_pos = is_dominant.nonzero().squeeze(1)  # sequence order
    rest = (~is_dominant).nonzero().squeeze(1)
    keys = k.mean(0) if code else k.permute(1, 0, 2).reshape(length, -1)
    metric = keys[start : start + m][rest]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, rest.numel() // contextual)
    target_pos = torch.arange(0, rest.numel(), step)[:contextual]
    others = torch.tensor(
        [p for p in range(rest.numel()) if p not in set(target_pos.tolist())], dtype=torch.long
    )
    owner = (unit[others] @ unit[target_pos].T).argmax(1)
    states = hidden[0, start : start + m][rest]
    new_hidden = hidden.clone()
    for j, t in enumerate(target_pos.tolist()):
        members = others[owner == j]
        mean = states[members].mean(0) if members.numel() else torch.zeros_like(states[0])
        new_hidden[0, start + int(rest[t])] = states[t] + mean
    span = torch.cat([dominant_pos, rest[target_pos]])
    span = span if code else span.sort().values
    order = torch.cat([torch.arange(start), start + span, torch.arange(start + m, length)])
    return order, new_hidden, span


def visiondrop_step(lm, boundaries: tuple[int, ...], start: int, found: dict, code: bool = True):
    """A `stepwise_logits` step running the code's three in-LLM stages before `boundaries`; found["stages"]
    collects, per stage, the kept tokens' indices into the LLM input (the `origin` of the kept span, in the
    new order). The new sequence is numbered 0, 1, 2, ... (the code's renumbering; written into the
    loop's position ids, which the loop then gathers in the new order). code=False: tokprune's documented
    deviations (`VisionDrop`, differences 1-3: concatenated keys, sequence order, positions kept)."""
    found["stages"] = []
    counts = {b: stage for b, stage in zip(boundaries, STAGES)}
    visual_count = [sum(PRE)]

    def step(view: LayerView):
        if view.layer not in counts:
            return None
        dominant, contextual = counts[view.layer]
        m = visual_count[-1]
        layer = lm.layers[view.layer]
        order, hidden, span = rank_drop(layer, lm.rotary_emb, view, start, m, dominant, contextual, code)
        found["stages"].append(view.origin[0, start + span].tolist())
        if code:
            view.position_ids[0, order] = torch.arange(order.numel())  # renumbered once gathered
        visual_count.append(dominant + contextual)
        return order[None], hidden

    return step
