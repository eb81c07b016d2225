"""Test-only reading of FastV's released selection, written from the authors' code (not copied).

Source: github.com/pkunlp-icler/FastV at commit d1659729b5bf1be225e99ee15783deeea80f63b1:
  * `src/transformers/src/transformers/models/llama/modeling_llama.py`, `LlamaModel.forward`, the
    `use_fast_v and fast_v_inplace` branch (the README's "main implementation", run by
    `src/FastV/inference/eval/eval_aokvqa_latency_fastv_inplace.sh`: `--fast-v-sys-length 36
    --fast-v-image-token-length 576 --fast-v-attention-rank {72,144,288,432} --fast-v-agg-layer 2`, i.e.
    K = 2 and the kept count (1 - R) * 576 given as an integer; `inference_aokvqa.py` calls generate with
    `use_cache=False, output_attentions=True, max_new_tokens=1`);
  * the llava-hf port, `src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py`,
    `LlamaModel.fastv_forward` (config keys `fastv_k`, `fastv_r`, `image_token_start_index`,
    `image_token_length`; `demo-hf.py`): the same selection, with the count `round(N * (1 - R))`;
  * `src/FastV/lmms-eval/fastv_kvcache.py` (the lmms-eval table): K = 3 and `int(576 * 0.5)` hard-coded,
    the attention of layer K - 1 from an extra eager pass; same selection otherwise.

What the inplace branch does for one prompt (batch 1, no padding), in words:
  * layers idx < K run on every token;
  * before layer K: take the attention weights layer K - 1 returned (eager, post-softmax, the causal map
    of that layer over the whole sequence), average them over the heads, take the row of the *last token
    of the sequence* (in a prefill: the last prompt token), keep its entries at the image span
    [sys_length, sys_length + image_token_length);
  * the top `attention_rank` of those entries (torch.topk) are kept, plus every token before and after the
    span; the kept indices are sorted (original order), the hidden states gathered, `position_ids` set to
    the kept indices (original positions), and a fresh causal mask built for the shorter sequence;
  * layers >= K run on the kept tokens only.
Generalised from LLaVA-1.5's constants: the image span(s) are read from the prompt, each image of a prompt
ranked on its own span with its own count (the code knows one span).
"""

from __future__ import annotations

import torch

from agreement.llm_steps import LayerView


def image_spans(visual: torch.Tensor, per_image: int) -> list[tuple[int, int]]:
    """(start, length) of every image's span in a one-row prompt; visual: (L,) bool, images of
    `per_image` tokens each, in order."""
    where = visual.nonzero().squeeze(1)
    return [(int(where[i]), per_image) for i in range(0, where.numel(), per_image)]


def fastv_kept(attention: torch.Tensor, start: int, n_image: int, count: int) -> torch.Tensor:
    """Sorted absolute indices of the image tokens kept. attention: (H, L, L) post-softmax map of layer
    K - 1; the row of the last token, head mean, at [start, start + n_image), top `count`."""
    row = attention.mean(dim=0)[-1]
    return (row[start : start + n_image].topk(count).indices + start).sort().values


def fastv_step(layer: int, spans: list[tuple[int, int]], count: int, found: dict):
    """A `stepwise_logits` step dropping before decoder layer `layer` (K) what the code drops; the kept
    absolute indices of each image land in found["kept"] (a list per image). Positions stay the tokens'
    own (the code's `position_ids = keep_indexs`)."""

    def step(view: LayerView):
        if view.layer != layer:
            return None
        keep = torch.ones(view.hidden.shape[1], dtype=torch.bool)
        found["kept"] = []
        for start, n in spans:
            kept = fastv_kept(view.attention[0], start, n, count)
            keep[start : start + n] = False
            keep[kept] = True
            found["kept"].append(kept)
        return keep[None]

    return step
