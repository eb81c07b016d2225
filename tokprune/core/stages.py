"""In-LLM stages: decoder-layer hooks that score, select and compact the residual stream at each boundary,
then give every later layer the stage's mask, RoPE tables and position ids (prefill), or the mask of the
stage's pruned cache (decode steps). The hooks sit on every decoder layer: in a prefill tokprune manages,
they also decide which position ids a layer sees (`positions.layer_position_ids`: none under flash
attention, which would read gapped ids as packed sequences)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tokprune.core.budget import Budget
from tokprune.core.compaction import Compaction
from tokprune.core.compat import cache_in
from tokprune.core.forward import Forward
from tokprune.core.masks import joined, layer_type
from tokprune.core.positions import layer_position_ids
from tokprune.core.selection import (
    content_counts,
    flagged_visual,
    select_llm,
    selection_key,
    text_after_images,
)
from tokprune.core.state import PrefillState, max_position
from tokprune.core.stats import StageStats, rewritten_visual
from tokprune.core.timing import timed
from tokprune.errors import MethodOptionError
from tokprune.methods.base import LLMMethod
from tokprune.signals.llm import cached_prefix, layer_signals

if TYPE_CHECKING:
    from tokprune.patches import Adapter


class StageHooks:
    """The in-LLM half of the engine (a mixin of `Engine`, which installs these hooks and owns the state)."""

    adapter: Adapter
    llm: list[tuple[LLMMethod, Budget]]
    stage_of: dict[int, tuple[int, int]]
    boundaries: list[int]
    fwd: Forward | None
    state: PrefillState | None
    _decode_tail: torch.Tensor | None
    _decode_masks: dict[tuple[int, str], object]
    positions: str
    order: str

    def _first_layers(self, start: int) -> dict[str, int]:
        """{layer type: index of its first decoder layer >= start} (the cache that sizes its masks)."""
        first: dict[str, int] = {}
        for i in range(start, len(self.adapter.decoder_layers)):
            first.setdefault(layer_type(self.adapter.text_config, i), i)
        return first

    def _make_score_hook(self, boundary: int):
        """Forward hook on layers[boundary - 1].self_attn: the boundary's signals from that layer."""

        def hook(module, args, kwargs, output):
            fwd = self.fwd
            if fwd is None or fwd.tokens is None:
                return None
            normed = kwargs.get("hidden_states", args[0] if args else None)
            # no_grad: the signals only select, and under gradient checkpointing this attention forward re-runs
            # in backward without the hook computing them: they must save nothing for autograd
            with timed(fwd.seconds, normed.device), torch.no_grad():
                fwd.llm_signals[boundary] = self._attention_signals(module, normed, kwargs, fwd, boundary)
            return None

        return hook

    def _attention_signals(
        self, attn: nn.Module, normed: torch.Tensor, kwargs, fwd: Forward, boundary: int
    ) -> dict:
        """The LLM signals the method asked for, from one attention module's input (B, L_cur, D)."""
        wanted = set(self._method_at(boundary).signals)
        kind = layer_type(self.adapter.text_config, attn.layer_idx)
        position_embeddings = fwd.position_embeddings.get(kind) or kwargs["position_embeddings"]
        tokens, pkv = fwd.tokens, cache_in(kwargs)
        context = None
        # a follow-up turn: its queries also attend to the earlier turns' cache. A sliding-window layer's
        # cache keeps only its window, and not the part this turn pushed out: it scores over the turn alone.
        if fwd.prefix is not None and kind != "sliding_attention":
            context = cached_prefix(pkv, attn.layer_idx, fwd.cache_mask_at(attn.layer_idx))
        return layer_signals(
            wanted, attn, normed, position_embeddings, pkv,
            tokens.prompt, tokens.image_id, text_after_images(tokens), context,
        )  # fmt: skip

    def _make_layer_hook(self, j: int):
        """Pre-hook of decoder layer j (every layer): in a prefill, the stage bookkeeping from the first
        boundary on, and the position ids the layer may see; in a decode step, the stage's mask."""

        def hook(module, args, kwargs):
            if self.fwd is not None and self.fwd.tokens is not None:
                if self.boundaries and j >= self.boundaries[0]:
                    args, kwargs = self._prefill_layer(j, module, args, kwargs)
                if "position_ids" in kwargs:
                    kwargs["position_ids"] = layer_position_ids(
                        kwargs["position_ids"], self.adapter.text_config
                    )
                return args, kwargs
            if self.state is not None and self.state.stage_masks and self._decode_tail is not None:
                return self._decode_layer(j, args, kwargs)
            return None

        return hook

    def _prefill_layer(self, j: int, layer: nn.Module, args, kwargs):
        fwd = self.fwd
        hidden = args[0] if args else kwargs["hidden_states"]
        kind = layer_type(self.adapter.text_config, j)
        if not fwd.position_embeddings:
            fwd.position_ids = kwargs.get("position_ids")
        if kind not in fwd.position_embeddings:  # the LM's table of this type, over the LM input
            cos, sin = kwargs["position_embeddings"]
            gather = fwd.source.take if fwd.source is not None else (lambda table: table)
            fwd.position_embeddings[kind] = (gather(cos), gather(sin))
        if j in self.boundaries:
            hidden = self._run_stage(j, layer, hidden, kwargs)
        if fwd.layer_masks:
            kwargs["attention_mask"] = fwd.layer_masks[kind]
            kwargs["position_embeddings"] = fwd.position_embeddings[kind]
            kwargs["position_ids"] = fwd.position_ids
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _method_at(self, boundary: int) -> LLMMethod:
        return self.llm[self.stage_of[boundary][0]][0]

    def _run_stage(self, boundary: int, layer: nn.Module, hidden: torch.Tensor, kwargs) -> torch.Tensor:
        fwd = self.fwd
        index, stage = self.stage_of[boundary]
        method, budget = self.llm[index]
        with timed(fwd.seconds, hidden.device):
            if stage == 0 and index > 0:  # a later method counts its budget on the tokens it receives
                fwd.entry_counts = content_counts(fwd.tokens, fwd.layout, fwd.image_rows)
            if method.score_at == "boundary":
                with torch.no_grad():  # the signals only select
                    normed = layer.input_layernorm(hidden)
                    fwd.llm_signals[boundary] = self._attention_signals(
                        layer.self_attn, normed, kwargs, fwd, boundary
                    )
            signals = dict(fwd.llm_signals.pop(boundary, {}))
            if "hidden" in method.signals:
                signals["hidden"] = self.adapter.language_model.norm(hidden)
            if "position" in method.signals:
                signals["position"] = prompt_index(fwd.tokens)
            signals.update(self._vision_signals_now(fwd, method))
            signals.update(_input_signals_now(fwd, method))
            counts = fwd.image_counts if method.counts_on_image else fwd.entry_counts
            received = hidden
            chosen = select_llm(
                method, budget, stage, fwd.tokens, fwd.layout, fwd.image_rows, counts, hidden, signals
            )
            keep, hidden = chosen.keep, chosen.hidden
            merged = rewritten_visual(received, hidden, fwd.tokens.visual_rank)
            extra = flagged_visual(chosen.extra, fwd.tokens.visual_rank)
        if keep is not None:
            visual = fwd.tokens.visual_rank >= 0
            emission = chosen.emission[visual] if chosen.emission is not None else None
            key = selection_key(fwd.tokens, visual, emission) if self.order == "selection" else None
            hidden = self._compact_stage(boundary, keep, hidden, key)
            if self.positions == "contiguous" and method.code_positions == "contiguous":
                self._renumber(boundary, hidden)
        if keep is not None or fwd.prefix is not None:  # a follow-up's later layers hold another cache
            self._stage_masks(boundary, hidden, cache_in(kwargs))
        kept = fwd.tokens.kept_visual()
        order = fwd.tokens.visual_slots()[0]
        fwd.stats.stages.append(StageStats.of(method.name, f"llm@{boundary}", kept, merged, extra, order))
        return hidden

    def _llm_vision_names(self) -> set[str]:
        """ViT signals the in-LLM methods read (e.g. MustDrop's [CLS]-protected key tokens)."""
        return {n for m, _ in self.llm for n in m.signals if self.adapter.is_vision_signal(n)}

    def _vision_signals_now(self, fwd: Forward, method: LLMMethod) -> dict[str, torch.Tensor]:
        """The ViT signals `method` reads, for the tokens present now: (B, L_cur, ...), 0 at text/padding."""
        rank = fwd.tokens.visual_rank  # (B, L_cur)
        out = {}
        for name in (n for n in method.signals if self.adapter.is_vision_signal(n)):
            value = fwd.vision_values[name]
            index = (fwd.visual_offsets.to(rank.device)[:, None] + rank).clamp(min=0)
            present = (rank >= 0).reshape(*rank.shape, *[1] * (value.dim() - 1))
            out[name] = value[index.to(value.device)] * present.to(value.device)
        return out

    def _compact_stage(
        self, boundary: int, keep: torch.Tensor, hidden: torch.Tensor, key: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Layers >= boundary see only `keep` (B, L_cur), laid out by `key` where given (the reproduction
        mode's emission order): gather the stream, RoPE tables, positions, 2-D mask."""
        fwd = self.fwd
        compaction = Compaction.from_keep(keep, key)
        self.adapter.compact_stage(keep, fwd.tokens.visual_rank >= 0)
        fwd.tokens = fwd.tokens.take(compaction)
        fwd.position_embeddings = {
            kind: (compaction.take(cos), compaction.take(sin))
            for kind, (cos, sin) in fwd.position_embeddings.items()
        }
        fwd.source = compaction if fwd.source is None else fwd.source.then(compaction)
        if fwd.position_ids is not None:
            fwd.position_ids = compaction.take_positions(fwd.position_ids)
        fwd.mask_2d = compaction.take_mask(fwd.mask_2d)
        fwd.segments.append((boundary, fwd.tokens.real_tokens(), fwd.tokens.valid.shape[1]))
        return compaction.take(hidden)

    def _renumber(self, boundary: int, hidden: torch.Tensor) -> None:
        """Layers >= boundary see the shortened sequence numbered 0, 1, ... (the authors' code, under
        `apply(positions="contiguous")`): new position ids and RoPE tables; the decode steps' shift kept."""
        from tokprune.core.engine import contiguous_positions

        fwd = self.fwd
        before = max_position(fwd.position_ids) + 1
        fwd.position_ids = contiguous_positions(fwd.mask_2d, self.adapter.position_rows())
        earlier = self.state.shift_at(
            boundary - 1
        )  # earlier renumbering stages, relative to the LM's numbering
        moved = max_position(fwd.position_ids) + 1 - before
        self.state.stage_shifts[boundary] = moved if earlier is None else earlier + moved
        rope = self.adapter.language_model.rotary_emb
        fwd.position_embeddings = {kind: rope(hidden, fwd.position_ids) for kind in fwd.position_embeddings}

    def _stage_masks(self, boundary: int, hidden: torch.Tensor, pkv) -> None:
        """The masks of layers >= boundary: over the cache those layers hold (a follow-up turn's earlier
        turns, as this stage pruned them) and the current tokens; kept for the decode steps."""
        fwd = self.fwd
        prefix = fwd.cache_mask_at(boundary) if fwd.prefix is not None else None
        mask_2d = joined(prefix, fwd.mask_2d)
        fwd.layer_masks = {
            kind: self.adapter.layer_mask(hidden, mask_2d, pkv, i, kind, fwd.tokens)
            for kind, i in self._first_layers(boundary).items()
        }
        self.state.stage_masks[boundary] = mask_2d

    def _decode_layer(self, j: int, args, kwargs):
        boundary = self.state.stage_at(j)
        if boundary is None:
            return None
        stage_mask = self.state.stage_masks[boundary]
        kind = layer_type(self.adapter.text_config, j)
        key = (boundary, kind)
        if key not in self._decode_masks:
            hidden = args[0] if args else kwargs["hidden_states"]
            mask_2d = joined(stage_mask, self._decode_tail)
            pkv = cache_in(kwargs)
            # the first layer of this type since the boundary sizes the mask (j, as layers run in order)
            self._decode_masks[key] = self.adapter.layer_mask(hidden, mask_2d, pkv, j, kind)
        kwargs["attention_mask"] = self._decode_masks[key]
        shift = self.state.shift_at(j)
        if shift is not None:  # a renumbering stage: this layer's positions are the LM's minus its drops
            rope_key = (boundary, "rope")
            if rope_key not in self._decode_masks:
                hidden = args[0] if args else kwargs["hidden_states"]
                positions = kwargs["position_ids"] + shift[:, None].to(kwargs["position_ids"])
                rope = self.adapter.language_model.rotary_emb(hidden, positions)
                self._decode_masks[rope_key] = (positions, rope)
            kwargs["position_ids"], kwargs["position_embeddings"] = self._decode_masks[rope_key]
        return args, kwargs


def _input_signals_now(fwd: Forward, method: LLMMethod) -> dict[str, torch.Tensor]:
    """The LLM-input signals `method` reads, for the tokens present now: (B, L_cur, ...)."""
    out = {}
    for name in (n for n in method.signals if n in fwd.input_values):
        value = fwd.input_values[name]
        out[name] = fwd.source.take(value) if fwd.source is not None else value
    return out


def llm_stages(llm: list[tuple[LLMMethod, Budget]], num_layers: int) -> dict[int, tuple[int, int]]:
    """{boundary layer: (index of its method in `llm`, stage of that method)}.

    Methods act one after the other: every boundary of a method lies after all boundaries of the methods
    before it, so each later method prunes what the earlier ones kept.
    """
    stages: dict[int, tuple[int, int]] = {}
    last = 0
    for index, (method, _) in enumerate(llm):
        bounds = method.boundaries(num_layers)
        if bounds and bounds[0] <= last:
            raise MethodOptionError(
                f"in-LLM methods act one after the other: {method.name} prunes at layers {bounds}, which "
                f"is not after layer {last} where the previous method prunes; set its layer(s) later"
            )
        for stage, boundary in enumerate(bounds):
            stages[boundary] = (index, stage)
        last = bounds[-1] if bounds else last
    return stages


def prompt_index(tokens) -> torch.Tensor:
    """(B, L_cur) long: every current token's index in its row's prompt counted from the row's first real
    token, as the authors' code (one unpadded row) numbers its sequence (the "position" LLM signal; -1 at
    padding)."""
    first = torch.where(tokens.valid, tokens.origin, tokens.origin.shape[1] + tokens.origin.max() + 1).amin(1)
    return (tokens.origin - first[:, None]).masked_fill(~tokens.valid, -1)
