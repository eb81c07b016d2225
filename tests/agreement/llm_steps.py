"""A step-by-step forward of a Llama-style language model for the in-LLM references (FastV, PyramidDrop,
SparseVLM, DART, MustDrop, VisionDrop), the way the authors' forks of `LlamaModel.forward` run it: one decoder
layer at a time, eager attention (so each layer's attention map is at hand), and between layers a callback
that may drop tokens from the hidden states, their position ids and the 2-D mask — as the official codes do
inside their modified layer loop. No cache: these references compare prefill outputs.

This file holds only the loop; each reference decides what to drop at which layer from what the loop gives
it (`LayerView`), following its own official code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask


@dataclass
class LayerView:
    """What a reference sees before decoder layer `layer` runs (B = 1 in the references).

    hidden: (B, L, D) the residual stream entering the layer; position_ids: (B, L); mask_2d: (B, L) long;
    attention: (B, H, L, L) the post-softmax map of the previous layer (None before layer 0) — the map the
    official codes read with `output_attentions`; keys: (B, H_kv, L, d) the previous layer's post-RoPE keys;
    origin: (B, L) the input position of every current token.
    """

    layer: int
    hidden: torch.Tensor
    position_ids: torch.Tensor
    mask_2d: torch.Tensor
    attention: torch.Tensor | None
    keys: torch.Tensor | None
    queries: torch.Tensor | None
    origin: torch.Tensor


# callback(view) -> None (nothing dropped) or (B, L) bool keep mask (same for hidden, positions, mask, origin)
# or a (keep, new_hidden) pair where the reference also rewrites the kept tokens' states
Step = Callable[[LayerView], "torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None"]


def _gather(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows of a one-row batch at `keep` (B = 1), along dim 1."""
    assert keep.shape[0] == 1, "the step-by-step forward runs one row"
    return x[:, keep[0]]


@torch.no_grad()
def stepwise_logits(
    model, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, mask_2d: torch.Tensor, step: Step
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (1, L_final, V) of the model's LM head after running the decoder layer by layer with eager
    attention, `step` deciding before every layer what to keep; and origin (1, L_final): the input position
    of every surviving token. inputs_embeds: (1, L, D) the LLM input (the unpruned model's)."""
    lm = model.model.language_model
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    captured: dict = {}

    def attn_hook(module, args, kwargs, output):
        captured["attention"] = output[1]

    def k_hook(module, args, output):
        captured["k_raw"] = output

    def q_hook(module, args, output):
        captured["q_raw"] = output

    hidden, positions, mask = inputs_embeds, position_ids, mask_2d
    origin = torch.arange(hidden.shape[1], device=hidden.device)[None]
    attention = keys = queries = None
    try:
        for i, layer in enumerate(lm.layers):
            decision = step(LayerView(i, hidden, positions, mask, attention, keys, queries, origin))
            if decision is not None:
                keep, new_hidden = decision if isinstance(decision, tuple) else (decision, None)
                hidden = _gather(new_hidden if new_hidden is not None else hidden, keep)
                positions, mask, origin = (_gather(t, keep) for t in (positions, mask, origin))
            cos, sin = lm.rotary_emb(hidden, position_ids=positions)
            causal = create_causal_mask(
                config=lm.config,
                inputs_embeds=hidden,
                attention_mask=mask,
                cache=None,
                position_ids=positions,
            )
            handles = [
                layer.self_attn.register_forward_hook(attn_hook, with_kwargs=True),
                layer.self_attn.k_proj.register_forward_hook(k_hook),
                layer.self_attn.q_proj.register_forward_hook(q_hook),
            ]
            try:
                hidden = layer(
                    hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=positions
                )
            finally:
                for h in handles:
                    h.remove()
            attention = captured["attention"]
            keys, queries = _post_rope(layer.self_attn, captured["k_raw"], captured["q_raw"], cos, sin)
        logits = model.lm_head(lm.norm(hidden))
    finally:
        model.set_attn_implementation(previous)
    return logits, origin


def _post_rope(attention, k_raw: torch.Tensor, q_raw: torch.Tensor, cos, sin):
    """(B, H_kv, L, d) keys and (B, H, L, d) queries of a Llama attention layer after RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, length, _ = k_raw.shape
    d = attention.head_dim
    k = k_raw.view(b, length, -1, d).transpose(1, 2)
    q = q_raw.view(b, length, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return k, q


def plain_inputs(case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs_embeds (1, L, D), position_ids (1, L), mask_2d (1, L)) of a one-row case, as generate() numbers
    it (from the 2-D mask)."""
    mask = case.inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return case.lm_input, positions, mask
