"""The masked reference of DESIGN §8: the *unpatched* model, dropped tokens masked out, original positions.

For a pruned run we know (from `Pruner.stats`) which visual tokens each stage kept, and which of those it
rewrote (`StageStats.merged`: the merged vectors of merging methods). The reference runs the unpatched
model on the full sequence without a cache, computing every state itself, with:
  * original position ids (what generate() computes from the unpruned mask);
  * for a pre-LLM stage, dropped tokens masked out in every layer, and only the tokens the stage rewrote
    given the LLM input the pruned run fed them (their merged values are checked against the methods'
    definitions by the per-method tests); every other present token of the pruned run's LLM input must
    equal the unpatched model's own LLM input there, bit for bit (checked here);
  * for an in-LLM stage at boundary b, dropped tokens masked out in layers >= b only, and only the tokens
    the stage rewrote entering layer b with the states the pruned run gave them;
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


def rewritten_positions(visual: torch.Tensor, stage) -> list[torch.Tensor]:
    """Per row: the sequence positions (B, L columns) of the visual tokens `stage` rewrote."""
    return [visual[row].nonzero().squeeze(1)[merged] for row, merged in enumerate(stage.merged)]


def _inject(target: torch.Tensor, source: torch.Tensor, present: torch.Tensor, positions) -> torch.Tensor:
    """`target` (B, L', D) with its vectors at `positions[row]` (sequence positions, all present) taken from
    the pruned run's `source` (B, L_s, D), whose last present[row].sum() slots hold the row's present tokens
    (present: (B, L) over the prompt) in order."""
    target = target.clone()
    for row, where in enumerate(positions):
        if where.numel():
            slots = present[row].nonzero().squeeze(1)
            index = source.shape[1] - slots.numel() + torch.searchsorted(slots, where)
            target[row, where] = source[row, index].to(target.dtype)
    return target


def assert_same_input(own: torch.Tensor, pruned: torch.Tensor, present: torch.Tensor, rewritten) -> None:
    """The pruned run's LLM input equals the unpatched model's, bit for bit, at every present token no
    stage rewrote (text included), differs from it at every token a stage says it rewrote, and holds
    nothing else.

    own: (B, L, D) the unpatched model's LLM input; pruned: (B, L0, D) the pruned run's, each row's present
    tokens right-aligned after left padding; present: (B, L) bool; rewritten: per row, sequence positions.
    """
    counts = present.sum(1)
    assert pruned.shape[1] == int(counts.max()), f"LLM input of {pruned.shape[1]} slots for {counts.tolist()}"
    for row in range(own.shape[0]):
        slots = present[row].nonzero().squeeze(1)
        got = pruned[row, pruned.shape[1] - slots.numel() :]
        same = ~torch.isin(slots, rewritten[row])
        expected = own[row, slots[same]]
        if not torch.equal(got[same], expected):
            bad = (got[same] != expected).any(-1)
            raise AssertionError(
                f"row {row}: the pruned LLM input differs from the unpatched model's at {int(bad.sum())} of "
                f"{int(same.sum())} present tokens no stage rewrote (positions {slots[same][bad][:8].tolist()})"
            )
        unchanged = (got[~same] == own[row, slots[~same]]).all(-1)
        assert not unchanged.any(), (
            f"row {row}: tokens reported rewritten are the unpatched ones: {unchanged}"
        )


def present_after(model, inputs: dict, stats, perm: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: the prompt tokens the last decoder layer (and so the logits) of the pruned prefill
    covers: the real tokens less every stage's dropped visual tokens (in the order `perm` lays them out)."""
    valid = inputs["attention_mask"].bool()
    if not stats.stages:
        return valid
    present = keep_mask(visual_mask(model, inputs["input_ids"]), valid, stats.stages[-1].kept)
    return present if perm is None else torch.gather(present, 1, perm)


def llm_order(model, inputs: dict, stats) -> torch.Tensor:
    """(B, L) the prompt's positions in the order the reproduction mode (`order="selection"`) feeds the LLM,
    from the stats alone: the slots of every image's kept tokens hold them in the order the LLM received
    them (`stats.input_order`); dropped tokens and text stay where they are (the identity when the kept
    tokens are in their own order)."""
    visual = visual_mask(model, inputs["input_ids"])
    rows = []
    for row, order in enumerate(stats.input_order):
        perm = torch.arange(visual.shape[1])
        positions = visual[row].nonzero().squeeze(1)
        # runs of consecutive placeholders: one image each (LLaVA, LLaVA-NeXT)
        breaks = (positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1
        start = 0
        for end in [*breaks.tolist(), positions.numel()]:
            kept = order[(order >= start) & (order < end)]
            perm[positions[kept.sort().values]] = positions[kept]
            start = end
        rows.append(perm)
    return torch.stack(rows)


def assert_close_scaled(got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Within tol x the largest |expected| (float32 summation-order noise grows with the logits)."""
    atol = tol * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def assert_prefill_matches(pruned: torch.Tensor, expected: torch.Tensor, present: torch.Tensor, tol: float):
    """Every real position of the pruned prefill equals the reference at the same original position.

    pruned: (B, L', V) the pruned run's logits, each row's present tokens right-aligned after left padding;
    expected: (B, L, V) the reference's over the whole prompt; present: (B, L) `present_after`.
    """
    counts = present.sum(1)
    assert pruned.shape[1] == int(counts.max()), f"{pruned.shape[1]} logit slots for {counts.tolist()} tokens"
    for row in range(pruned.shape[0]):
        n = int(counts[row])
        assert_close_scaled(pruned[row, pruned.shape[1] - n :], expected[row, present[row]], tol)


def assert_steps_match(steps, reference: list[torch.Tensor], tol: float) -> None:
    """generate()'s per-step logits [(B, V)] equal the reference's: the first comes from the prefill's last
    position, step t >= 1 follows t generated tokens."""
    assert_close_scaled(steps[0], reference[0][:, -1], tol)
    for step in range(1, len(steps)):
        assert_close_scaled(steps[step], reference[step], tol)


def _check_merged(stats, lm_input, stage_hidden) -> None:
    """Every stage's rewritten tokens are among its kept ones; refuse a reference that could not give
    them their values."""
    for stage in stats.stages:
        assert all(bool(torch.isin(m, k).all()) for m, k in zip(stage.merged, stage.kept)), stage.where
        if not any(m.numel() for m in stage.merged):
            continue
        boundary = 0 if stage.where == "pre" else int(stage.where.split("@")[1])
        given = lm_input if boundary == 0 else (stage_hidden or {}).get(boundary)
        if given is None:
            raise ValueError(f"stage {stage.where} rewrote tokens: pass the pruned run's stream it fed")


def slots_of(layout: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Where original `positions` (B, n) sit in `layout` (B, L): layout[b, slot] = original position."""
    inverse = layout.argsort(1)
    return torch.gather(inverse, 1, positions)


def relaid(layout: torch.Tensor, visual: torch.Tensor, order: list[torch.Tensor]) -> torch.Tensor:
    """`layout` (B, L) with each row's kept visual tokens put in `order` (per row, visual-token indices in
    the order the pruned run's later layers hold them) into the slots they occupy; everything else stays."""
    new = layout.clone()
    for row, kept in enumerate(order):
        if kept.numel() == 0:
            continue
        wanted = visual[row].nonzero().squeeze(1)[kept]  # their original positions, in the run's order
        slots = slots_of(layout[row : row + 1], wanted[None])[0].sort().values
        new[row, slots] = wanted
    return new


@torch.no_grad()
def reference_logits(
    model,
    inputs: dict,
    stats,
    lm_input: torch.Tensor | None,
    new_tokens: torch.Tensor,
    stage_hidden: dict[int, torch.Tensor] | None = None,
    perm: torch.Tensor | None = None,
    positions: str = "original",
    renumbered: frozenset[int] = frozenset(),
    layout_out: list | None = None,
):
    """Logits of the masked reference for the prompt and each generated prefix.

    lm_input: (B, L0, D) the LLM input of the pruned prefill `stats` describe (`LMInputRecorder`), or None:
        checked bit for bit with `assert_same_input`, and the source of what a pre-LLM stage rewrote.
    stage_hidden: {boundary b: (B, L_b, D) the stream the pruned prefill fed layer b} (`StageInputRecorder`),
        the source of what the in-LLM stage at b rewrote.
    perm: (B, L) the order the reproduction mode lays the prompt out in (`llm_order`), or None (as given):
        the reference runs the unpatched language model on the prompt in that order, masked the same way;
        an in-LLM stage whose `order` differs from the layout the layers hold re-lays its kept tokens so
        before its boundary layer (the residual stream permuted, `relaid`).
    positions: "original" (generate()'s numbering of the unpruned prompt) or "contiguous" (0, 1, ... over
        the tokens present after the pre-LLM stage, in `perm` order, as the authors' LLaVA code numbers it);
        with "contiguous", layers from every boundary in `renumbered` on are numbered 0, 1, ... over the
        tokens still present there (the in-LLM stages whose code renumbers).
    layout_out: a list that receives the prefill's final layout (B, L): the original prompt position of
        every slot of the returned prefill logits.
    Raises ValueError when a stage rewrote tokens whose source was not given.
    Returns a list: [prefill logits (B, L, V) over the prompt, in the final layout] + [(B, V) per decode step].
    """
    _check_merged(stats, lm_input, stage_hidden)
    visual = visual_mask(model, inputs["input_ids"])
    valid = inputs["attention_mask"].bool()
    batch, prompt = visual.shape
    perm = perm if perm is not None else torch.arange(prompt).expand(batch, -1)
    keeps = {s.where: keep_mask(visual, valid, s.kept) for s in stats.stages}  # original coordinates
    rewritten = {s.where: rewritten_positions(visual, s) for s in stats.stages}
    orders = {s.where: getattr(s, "order", None) or s.kept for s in stats.stages}
    lm = language_model(model)
    layer_types = getattr(lm.config, "layer_types", None)
    handles = []
    state = {}

    def gather(x: torch.Tensor) -> torch.Tensor:  # (B, L, ...) original coordinates -> the current layout
        layout = state["layout"]
        index = layout if x.dim() == 2 else layout[..., None].expand(-1, -1, x.shape[2])
        return torch.gather(x, 1, index)

    def positions_now() -> torch.Tensor:  # 1-D / M-RoPE rows of the current layout
        given = state["positions"]
        if given.dim() == 2:
            return torch.gather(given, 1, state["layout"])
        return torch.gather(given, 2, state["layout"][None].expand(given.shape[0], -1, -1))

    def lm_pre(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        ones = torch.ones(batch, embeds.shape[1] - prompt, dtype=torch.bool)
        given = kwargs["attention_mask"]  # a dict per layer type where the model builds one (Gemma 3)
        mask = (state["input_mask"] if isinstance(given, dict) else given).bool()
        tail = torch.arange(prompt, embeds.shape[1]).expand(batch, -1)
        state["layout"] = torch.cat([perm, tail], 1)
        present = valid & keeps["pre"] if "pre" in keeps else valid
        state["mask"] = mask & torch.cat([present | ~valid, ones], 1)  # original coordinates
        embeds, mask = gather(embeds), gather(state["mask"])
        present = torch.gather(present, 1, perm)
        merged = [
            slots_of(perm[r : r + 1], p[None])[0].sort().values
            for r, p in enumerate(rewritten.get("pre", []))
        ]
        merged = merged or [torch.zeros(0, dtype=torch.long)] * batch
        if lm_input is not None:
            assert_same_input(embeds[:, :prompt], lm_input, present, merged)
            embeds = _inject(embeds, lm_input, present, merged)
        kwargs["inputs_embeds"], kwargs["attention_mask"] = embeds, mask.long()
        if positions == "contiguous":  # over the tokens the pre-LLM stage left, in LLM order
            numbered = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
            state["positions"] = torch.zeros_like(numbered).scatter(1, state["layout"], numbered)
        else:  # every token keeps its own position
            state["positions"] = kwargs["position_ids"]
        kwargs["position_ids"] = positions_now()
        state["relaid"] = False
        return args, kwargs

    def make_layer_pre(j):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            where = f"llm@{j}"
            if (
                where in orders
            ):  # the stage's kept tokens, laid out as the pruned run's later layers hold them
                new = relaid(state["layout"], visual, orders[where])
                if not torch.equal(new, state["layout"]):
                    move = slots_of(state["layout"], new)
                    hidden = torch.gather(hidden, 1, move[..., None].expand(-1, -1, hidden.shape[2]))
                    state["layout"], state["relaid"] = new, True
            mask = state["mask"].clone()
            for stage, keep in keeps.items():
                if stage != "pre" and j >= int(stage.split("@")[1]):
                    mask[:, :prompt] &= keep | ~valid
            mask = gather(mask)
            merged = rewritten.get(where)
            if merged is not None and any(m.numel() for m in merged):  # in-LLM merges, as the pruned run
                slots = [
                    slots_of(state["layout"][r : r + 1, :prompt], m[None])[0].sort().values
                    for r, m in enumerate(merged)
                ]
                hidden = _inject(hidden, stage_hidden[j], mask[:, :prompt], slots)
            args, kwargs = (
                ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            )
            if positions == "contiguous" and any(b <= j for b in renumbered):
                numbered = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
                kwargs["position_ids"] = numbered
                kwargs["position_embeddings"] = lm.rotary_emb(hidden, numbered)
            elif state["relaid"]:  # moved tokens keep their positions
                kwargs["position_ids"] = positions_now()
                kwargs["position_embeddings"] = lm.rotary_emb(hidden, kwargs["position_ids"])
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
            if step == 0 and layout_out is not None:
                layout_out.append(state["layout"][:, :prompt].clone())
        return outputs
    finally:
        for h in handles:
            h.remove()
