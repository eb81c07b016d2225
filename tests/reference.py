"""The masked reference of DESIGN §8: the *unpatched* model, dropped tokens masked out, original positions.

For a pruned run we know (from `Pruner.stats`) which visual tokens each stage kept. The reference runs
the unpatched model on the full sequence without a cache, with:
  * original position ids (what generate() computes from the unpruned mask);
  * for pre-LLM stages, the LLM input embeddings of kept tokens replaced by what the pruned run fed the
    LLM (merging methods change them; their values are checked against their definitions elsewhere) and
    dropped tokens masked out in every layer;
  * for an in-LLM stage at boundary b, dropped tokens masked out in layers >= b only, and (given
    `stage_hidden`) the kept visual tokens entering layer b with the states the pruned run gave them
    (methods that merge inside the LLM change them; checked against their definitions elsewhere);
  * the model's own attention pattern on what is left: bidirectional blocks where the model builds them
    from token_type_ids (Gemma 3's images, by the model module's own rule), and on sliding-window
    layers the window counted in slots of the pruned sequence, i.e. in tokens still present (the
    pruned run's cache holds only those).
"""

from __future__ import annotations

import sys

import torch
from transformers.masking_utils import blockwise_overlay, create_causal_mask

from tokprune.core.compat import CACHE_KWARG
from tokprune.methods import LLMMethod


def original_positions(model, inputs: dict) -> torch.Tensor:
    """Position ids generate() gives the unpruned prompt (+ any appended text tokens)."""
    mask = inputs["attention_mask"]
    if "image_grid_thw" in inputs or "video_grid_thw" in inputs:
        pos, _ = model.model.get_rope_index(
            inputs["input_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=mask,
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        return pos
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def language_model(model):
    """The decoder stack of a VLM: `model.model.language_model`, or `text_model` (Idefics3, SmolVLM)."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model


def visual_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Image placeholders, and video placeholders on models that have them (Qwen)."""
    video = getattr(model.config, "video_token_id", None)
    return (input_ids == model.config.image_token_id) | (video is not None and input_ids == video)


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
        self.handle = language_model(model).register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if self.embeds is None:
            self.embeds = kwargs["inputs_embeds"].detach().clone()

    def remove(self):
        self.handle.remove()


class StageInputRecorder:
    """The stream the first forward after a reset feeds each in-LLM boundary layer, after the engine's
    compaction (and merging): `hidden` = {boundary: (B, L_b, D)} (register after tokprune.apply)."""

    def __init__(self, model, pruner):
        layers = language_model(model).layers
        bounds = [b for m in pruner.methods if isinstance(m, LLMMethod) for b in m.boundaries(len(layers))]
        self.hidden: dict[int, torch.Tensor] = {}
        self.handles = [layers[b].register_forward_pre_hook(self._hook(b), with_kwargs=True) for b in bounds]

    def _hook(self, boundary: int):
        def hook(module, args, kwargs):
            if boundary not in self.hidden:
                self.hidden[boundary] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def stage_plan(pruner, content: list[int], n_layers: int) -> tuple[list[int], list[list[int]]]:
    """(boundary of every installed stage, per stage the count each item keeps), from the methods' own
    budget arithmetic, not from the engine. A pre-LLM stage sits at boundary 0; an in-LLM method counts on
    the tokens each item has when it starts, a composite's in-LLM part (`counts_on_image`) on the whole
    item. content: content tokens of every item (separators left out)."""
    bounds: list[int] = []
    stages: list[list[int]] = []
    for method, budget in zip(pruner.methods, pruner.budgets):
        if not isinstance(method, LLMMethod):
            bounds, stages = [0], [[budget.kept(c) for c in content]]
            continue
        received = (
            content
            if method.counts_on_image or not stages
            else [min(k, c) for k, c in zip(stages[-1], content)]
        )
        own = method.boundaries(n_layers)
        bounds += own
        stages += [[method.stage_counts(c, budget)[s] for c in received] for s in range(len(own))]
    return bounds, stages


def _extend(inputs: dict, new_tokens: torch.Tensor) -> dict:
    """The prompt with generated tokens appended (mask 1, text type)."""
    out = dict(inputs)
    n = new_tokens.shape[1]
    out["input_ids"] = torch.cat([inputs["input_ids"], new_tokens], 1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new_tokens)], 1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if inputs.get(key) is not None:
            out[key] = torch.cat([inputs[key], torch.zeros_like(new_tokens)], 1)
    return out, n


def attention_blocks(model, inputs: dict) -> torch.Tensor | None:
    """(B, L) bidirectional block id of every token (-1: causal only), where the unpatched model builds such
    blocks from token_type_ids (Gemma 3: each run of image tokens), by its own module's rule; else None."""
    block_ids = getattr(sys.modules[type(model.model).__module__], "get_block_sequence_ids_for_mask", None)
    token_types = inputs.get("token_type_ids")
    return None if block_ids is None or token_types is None else block_ids(token_types)


def _slot_window(mask: torch.Tensor, window: int):
    """Mask function of a sliding window counted in tokens still present (mask (B, L) bool): key kv is
    visible from query q when fewer than `window` present tokens lie in (kv, q], as cache slots of the
    pruned sequence count them."""
    rank = mask.long().cumsum(1)

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return rank[batch_idx, kv_idx] > rank[batch_idx, q_idx] - window

    return inner


@torch.no_grad()
def _with_states(hidden: torch.Tensor, recorded: torch.Tensor, present: torch.Tensor, visual: torch.Tensor):
    """hidden (B, L, D) with its present visual tokens' states taken from the pruned run's stream
    `recorded` (B, L_b, D), whose last present[row].sum() slots hold row's present tokens in order."""
    hidden = hidden.clone()
    for row in range(hidden.shape[0]):
        where = present[row].nonzero().squeeze(1)
        states = recorded[row, recorded.shape[1] - where.numel() :]
        is_visual = visual[row, where]
        hidden[row, where[is_visual]] = states[is_visual].to(hidden.dtype)
    return hidden


@torch.no_grad()
def reference_logits(
    model,
    inputs: dict,
    stats,
    pre_embeds: torch.Tensor | None,
    new_tokens: torch.Tensor,
    stage_hidden: dict[int, torch.Tensor] | None = None,
):
    """Last-position logits of the masked reference for the prompt and each generated prefix.

    stage_hidden: {boundary b: (B, L_b, D) the stream the pruned prefill fed layer b} for in-LLM stages.
    Returns a list: [prefill logits (B, L, V) over the prompt] + [(B, V) for each decode step].
    """
    visual = visual_mask(model, inputs["input_ids"])
    valid = inputs["attention_mask"].bool()
    stage_keeps = [(s.where, keep_mask(visual, valid, s.kept)) for s in stats.stages]
    lm = language_model(model)
    layer_types = getattr(lm.config, "layer_types", None)
    handles = []
    state = {}

    def lm_pre(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        length = embeds.shape[1]
        extra = length - visual.shape[1]
        ones = torch.ones(visual.shape[0], extra, dtype=torch.bool)
        given = kwargs["attention_mask"]  # a dict per layer type where the model builds one (Gemma 3)
        mask = (state["input_mask"] if isinstance(given, dict) else given).bool()
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
            if stage_hidden is not None and j in stage_hidden:  # an in-LLM boundary of the pruned run
                hidden = _with_states(hidden, stage_hidden[j], mask[:, : visual.shape[1]], visual)
                args, kwargs = (
                    ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
                )
            sliding = layer_types is not None and layer_types[j] == "sliding_attention"
            kwargs["attention_mask"] = create_causal_mask(
                config=lm.config,
                inputs_embeds=hidden,
                attention_mask=mask.long(),
                **{CACHE_KWARG: None},
                or_mask_function=blockwise_overlay(state["blocks"]) if state["blocks"] is not None else None,
                and_mask_function=_slot_window(mask, lm.config.sliding_window) if sliding else None,
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
            state["input_mask"], state["blocks"] = ext["attention_mask"], attention_blocks(model, ext)
            logits = model(**ext, use_cache=False).logits
            outputs.append(logits if step == 0 else logits[:, -1])
        return outputs
    finally:
        for h in handles:
            h.remove()
