"""The masked reference of DESIGN §8: the *unpatched* model, dropped tokens masked out, original positions.

For a pruned run we know (from `Pruner.stats`) which visual tokens each stage kept. The reference runs
the unpatched model on the full sequence without a cache, with:
  * original position ids (what generate() computes from the unpruned mask);
  * for pre-LLM stages, the LLM input embeddings of kept tokens replaced by what the pruned run fed the
    LLM (merging methods change them; their values are checked against their definitions elsewhere) and
    dropped tokens masked out in every layer;
  * for an in-LLM stage at boundary b, dropped tokens masked out in layers >= b only.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask


def original_positions(model, inputs: dict) -> torch.Tensor:
    """Position ids generate() gives the unpruned prompt (+ any appended text tokens)."""
    mask = inputs["attention_mask"]
    if "image_grid_thw" in inputs:
        pos, _ = model.model.get_rope_index(
            inputs["input_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            video_grid_thw=None,
            attention_mask=mask,
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        return pos
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def visual_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    return input_ids == model.config.image_token_id


def keep_mask(visual: torch.Tensor, valid: torch.Tensor, kept: list[torch.Tensor]) -> torch.Tensor:
    """(B, L) True for real tokens present after a stage (text + kept visual)."""
    keep = valid.clone()
    for row, idx in enumerate(kept):
        vis_pos = visual[row].nonzero().squeeze(1)
        dropped = torch.ones(vis_pos.numel(), dtype=torch.bool)
        dropped[idx] = False
        keep[row, vis_pos[dropped]] = False
    return keep


class LMInputRecorder:
    """Records the inputs_embeds the language model receives (register after tokprune.apply)."""

    def __init__(self, model):
        self.embeds = None
        self.handle = model.model.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if self.embeds is None:
            self.embeds = kwargs["inputs_embeds"].detach().clone()

    def remove(self):
        self.handle.remove()


def _extend(inputs: dict, new_tokens: torch.Tensor) -> dict:
    """The prompt with generated tokens appended (mask 1, text type)."""
    out = dict(inputs)
    n = new_tokens.shape[1]
    out["input_ids"] = torch.cat([inputs["input_ids"], new_tokens], 1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new_tokens)], 1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new_tokens)], 1)
    return out, n


@torch.no_grad()
def reference_logits(model, inputs: dict, stats, pre_embeds: torch.Tensor | None, new_tokens: torch.Tensor):
    """Last-position logits of the masked reference for the prompt and each generated prefix.

    Returns a list: [prefill logits (B, L, V) over the prompt] + [(B, V) for each decode step].
    """
    visual = visual_mask(model, inputs["input_ids"])
    valid = inputs["attention_mask"].bool()
    stage_keeps = [(s.where, keep_mask(visual, valid, s.kept)) for s in stats.stages]
    lm = model.model.language_model
    handles = []
    state = {}

    def lm_pre(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        length = embeds.shape[1]
        extra = length - visual.shape[1]
        ones = torch.ones(visual.shape[0], extra, dtype=torch.bool)
        mask = kwargs["attention_mask"].bool()
        for where, keep in stage_keeps:
            if where == "pre":
                if pre_embeds is not None:
                    embeds = embeds.clone()
                    for row in range(embeds.shape[0]):
                        n = int(keep[row].sum())
                        embeds[row, : visual.shape[1]][keep[row]] = pre_embeds[row, -n:]
                mask = mask & torch.cat([keep, ones], 1)
        kwargs["inputs_embeds"], kwargs["attention_mask"] = embeds, mask.long()
        state["full"] = {where: torch.cat([keep, ones], 1) for where, keep in stage_keeps if where != "pre"}
        state["mask"] = mask
        return args, kwargs

    def make_layer_pre(j):
        def pre(module, args, kwargs):
            mask = state["mask"]
            for where, keep in state["full"].items():
                if j >= int(where.split("@")[1]):
                    mask = mask & keep
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs["attention_mask"] = create_causal_mask(
                config=lm.config, inputs_embeds=hidden, attention_mask=mask.long(), past_key_values=None
            )
            return args, kwargs

        return pre

    handles.append(lm.register_forward_pre_hook(lm_pre, with_kwargs=True))
    for j, layer in enumerate(lm.layers):
        handles.append(layer.register_forward_pre_hook(make_layer_pre(j), with_kwargs=True))
    try:
        outputs = []
        for step in range(new_tokens.shape[1] + 1):
            ext, _ = _extend(inputs, new_tokens[:, :step])
            ext["position_ids"] = original_positions(model, ext)
            logits = model(**ext, use_cache=False).logits
            outputs.append(logits if step == 0 else logits[:, -1])
        return outputs
    finally:
        for h in handles:
            h.remove()
