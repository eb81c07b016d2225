"""Test-only reading of DART's released selection (LLaVA path), written from the authors' code (not copied).

Source: github.com/ZichenWen1/DART, LLaVA-1.5 code (the repository's README at commit
0c888673198b0f2784053a5686f95a519ceef209; the code itself was read from the stored copy of its LLaVA
files, which this sandbox holds without their repository name):
  * the fork of `LlamaModel.forward` (class `DART_K_norm`): before decoder layer K runs (K = `pruned_layer`,
    2 in the eval scripts), the output of layer K - 1 goes through the model's final norm, the keys of
    layer K - 1 (the attention module's post-RoPE key states, returned by the layer) are read, and
    `get_retained_image_token` picks the image tokens to keep; the kept sequence = prefix, kept image
    tokens, text, sorted, and its position ids are the kept tokens' own indices (original positions);
  * `get_retained_image_token(config, last_layer_state, K_states)`;
  * `llava/eval/model_vqa_loader.py: configure_DART` and its argparse defaults: K = 2,
    image_token_start_index = 35, image_token_length = 576, max_num_trunction = 128, pivot_image_token =
    pivot_text_token = 4 (the README: `bash scripts/v1_5/eval/textvqa.sh 0.778 128`).
ModelTC/LightCompress (`llmc/compression/token_reduction/dart.py`, commit
9701d035b0aac5df97a2ebaadb30bcf0707616f5) is an independent port of the same routine (keys from layer
K - 1's KV cache); it derives its per-pivot count from the reduction ratio instead (int(576 * 0.222 / 8) =
15 where the official code has 128 // 8 = 16).

What the code does for one prompt (batch 1, no padding, one image span), in words:
  * keys of layer K - 1: (H_kv, L, d) -> (L, H_kv * d), heads concatenated; L1 norm of every row;
  * image pivots: the `pivot_image` image tokens of largest L1 norm; text pivots: the `pivot_text` tokens
    of largest L1 norm among *all* tokens after the image span (the question and the "ASSISTANT:" suffix);
  * the pivots, as absolute sequence indices, go into a Python set (image pivots first, each group by
    descending norm) and are visited in that set's iteration order (CPython: by the integers' hash
    slots, a deterministic function of the indices, not a deliberate order);
  * candidates: every image token but the image pivots; each visited pivot takes the `per_pivot` =
    max_num_trunction // (pivot_image + pivot_text) candidates of lowest cosine similarity between its
    normed state and theirs (the states entering layer K after the final norm), removing them from the
    candidates;
  * kept image tokens = image pivots + every pivot's picks: pivot_image + P * per_pivot in all (132 for
    the published 128).
Generalised from LLaVA-1.5's constants: the image span's start and length are read from the prompt, and
`per_pivot` is computed from the budget given.
"""

from __future__ import annotations

import torch

from agreement.llm_steps import LayerView


def dart_kept(
    keys: torch.Tensor,
    states: torch.Tensor,
    start: int,
    n_image: int,
    budget: int,
    pivot_image: int = 4,
    pivot_text: int = 4,
) -> list[int]:
    """The absolute sequence indices of the image tokens the code keeps (sorted).

    keys: (H_kv, L, d) post-RoPE keys of layer K - 1; states: (L, D) the states entering layer K after the
    final norm; start, n_image: the image span; budget: the code's `max_num_trunction`.
    """
    flat = keys.permute(1, 0, 2).reshape(keys.shape[1], -1).float()
    l1 = flat.abs().sum(-1)
    end = start + n_image
    image_pivots = (l1[start:end].topk(pivot_image).indices + start).tolist()
    text_pivots = (l1[end:].topk(pivot_text).indices + end).tolist()
    per_pivot = budget // (pivot_image + pivot_text)
    visit = list(set(image_pivots + text_pivots))  # the code's set iteration order
    candidates = set(range(start, end)) - set(image_pivots)
    kept = set(image_pivots)
    for pivot in visit:
        pool = list(candidates)
        similarity = torch.nn.functional.cosine_similarity(
            states[pivot].float(), states[pool].float(), dim=-1
        )
        picks = [pool[i] for i in (-similarity).topk(per_pivot).indices.tolist()]
        kept.update(picks)
        candidates.difference_update(picks)
    return sorted(kept)


def dart_step(lm, layer: int, start: int, n_image: int, budget: int, found: dict):
    """A `stepwise_logits` step running the code's drop before decoder layer `layer`; the kept image
    tokens' absolute indices land in found["kept"]. Positions stay the tokens' own (the code's
    `position_ids = keep_indexs`)."""

    def step(view: LayerView):
        if view.layer != layer:
            return None
        states = lm.norm(view.hidden)[0]
        kept = dart_kept(view.keys[0], states, start, n_image, budget)
        found["kept"] = kept
        keep = torch.ones(view.hidden.shape[1], dtype=torch.bool)
        keep[start : start + n_image] = False
        keep[kept] = True
        return keep[None]

    return step
