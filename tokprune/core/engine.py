"""The engine: hooks on module instances that prune visual tokens before and inside the language model.

Hook points (DESIGN §4):
  * inner model pre-hook: remembers input_ids and the image layout; in decode loops that pass no
    position ids, supplies the original numbering (cache length + dropped tokens);
  * vision hooks (adapter): ViT-side signals;
  * language-model pre-hook: pre-LLM selection and compaction of inputs_embeds, mask and position ids
    (prefill); rebuild of the 2-D mask against the pruned cache (decode); a follow-up turn's new images
    on a reused cache (`turns.py`);
  * decoder-layer hooks (`stages.py`), on every layer: the position ids a layer sees (none under flash
    attention); from the first in-LLM boundary on, stage selection and compaction of the residual
    stream, then the stage's mask / RoPE tables / position ids for every later layer.
Kept tokens keep their original positions and order (unless the reproduction mode, `apply(order="selection",
positions="contiguous")`, lays them out and numbers them as the authors' code does); rows are re-packed with
left padding. A pre-LLM method on the vision tower's features (`Method.features == "vision"`) sees the
projector's input rows; the adapter projects the rows it merged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokprune.core.budget import Budget
from tokprune.core.compaction import Compaction
from tokprune.core.compat import cache_in, output_cache
from tokprune.core.conversations import CallLock, ConversationHooks, keep_on
from tokprune.core.forward import Forward
from tokprune.core.generation import guard_generate
from tokprune.core.labels import LabelHooks
from tokprune.core.layout import (
    ImageLayout,
    VisionSignalStore,
    brings_images,
    image_rows,
    runs_vision_tower,
)
from tokprune.core.masks import check_mask_support, joined
from tokprune.core.positions import shifted
from tokprune.core.selection import (
    align_signals,
    content_counts,
    flagged_visual,
    select_pre,
    selection_key,
    text_after_images,
)
from tokprune.core.stages import StageHooks, llm_stages
from tokprune.core.state import PrefillState, TokenMap, max_position
from tokprune.core.stats import PruneStats, StageStats, rewritten_visual, unpruned_stats
from tokprune.core.timing import timed
from tokprune.core.turns import FollowUpHooks
from tokprune.core.wrap import refuse_copies
from tokprune.errors import UnsupportedInputError, UnsupportedModelError
from tokprune.methods.base import LLMMethod, Method
from tokprune.signals.llm import INPUT_SIGNALS

if TYPE_CHECKING:
    from tokprune.patches import Adapter


class Engine(StageHooks, FollowUpHooks, ConversationHooks):
    """Installs and removes every hook of one pruning configuration on one model instance."""

    def __init__(
        self,
        adapter: Adapter,
        pre: tuple[Method, Budget] | None,
        llm: list[tuple[LLMMethod, Budget]],
        order: str = "original",
        positions: str = "original",
    ) -> None:
        """pre: the pre-LLM method and its budget, or None; llm: the in-LLM methods in layer order, each
        with its budget (counted on the content tokens of an image when the method's first stage starts);
        order / positions: the reproduction mode's layout of the LLM input ("selection": each image's kept
        tokens in the order its selection emits them; "contiguous": position ids renumbered 0, 1, ... over
        the kept tokens, as the authors' LLaVA code builds the sequence), checked by `tokprune.apply`."""
        self.adapter = adapter
        self.pre, self.pre_budget = pre if pre is not None else (None, None)
        self.llm = llm
        self.order, self.positions = order, positions
        self.store = VisionSignalStore()
        self._init_conversations()
        self.lock = CallLock()
        self.fwd: Forward | None = None
        self.last_stats: PruneStats | None = None
        # (B, L') input position of every slot the last forward's LM output covers; None: not compacted
        self.last_origin: torch.Tensor | None = None
        # inside generate(): the prompt's length (assisted generation's prefill also holds the first drafts,
        # use_cache=False re-runs the prompt with the tokens generated so far)
        self.prompt_length: int | None = None
        self._call_starts = False
        self._decode_tail: torch.Tensor | None = None
        self._decode_masks: dict[tuple[int, str], object] = {}
        # the attention_mask the inner model received this forward (2-D or None); {} = unknown. Families
        # whose inner model hands the LM a dict of per-layer-type masks (Gemma 3) build it from this one.
        self._inner_mask: torch.Tensor | dict | None = {}
        self.stage_of = llm_stages(llm, len(adapter.decoder_layers))  # boundary -> (method index, stage)
        self.boundaries = sorted(self.stage_of)
        self.handles: list = []
        try:
            self._install()
        except Exception:
            self.remove()  # a half-installed configuration never stays on the model
            raise

    # ------------------------------------------------------------------ install / remove
    def _install(self) -> None:
        a = self.adapter
        self.handles.append(a.inner.register_forward_pre_hook(self._on_inner, with_kwargs=True))
        if self.pre is not None and self.pre.features == "vision" and "features" not in a.feature_signals:
            raise UnsupportedModelError(
                f"{self.pre.name} works on the vision tower's features before the projector, which tokprune "
                f"cannot take from {type(a.model).__name__} (families that give them: "
                f"{', '.join(_families_with_features())}); see the method's options for one that works on "
                "the LLM input"
            )
        vit_names = {n for n in self._pre_signals() if a.is_vision_signal(n)}
        vit_names |= self._llm_vision_names()
        feature_names = vit_names & set(a.feature_signals)
        self.handles += a.install_vision_hooks(vit_names - feature_names, self.store)
        self.handles += a.install_feature_hooks(feature_names, self.store)
        self.handles += a.install_lm_hooks()
        self.handles += self.lock.install(a.model)
        self.handles.append(guard_generate(a.model, self._set_prompt_length, self.lock))
        self.handles.append(LabelHooks(a.model, lambda: self.last_origin))
        self.handles.append(refuse_copies(a.model))
        self.handles.append(a.language_model.register_forward_pre_hook(self._on_lm, with_kwargs=True))
        self.handles.append(a.language_model.register_forward_hook(self._on_lm_done))
        layers = a.decoder_layers
        for b in self.boundaries:
            if self._method_at(b).score_at == "previous":
                hook = self._make_score_hook(b)
                self.handles.append(layers[b - 1].self_attn.register_forward_hook(hook, with_kwargs=True))
        for j in range(len(layers)):  # every layer: the position ids it sees (stages.py), then the stages
            self.handles.append(
                layers[j].register_forward_pre_hook(self._make_layer_hook(j), with_kwargs=True)
            )

    def _pre_signals(self) -> tuple[str, ...]:
        """The signals the pre-LLM method reads, with the projector's input ("features") for a method that
        works on the vision tower's features."""
        if self.pre is None:
            return ()
        return (*self.pre.signals, "features") if self.pre.features == "vision" else tuple(self.pre.signals)

    def _set_prompt_length(self, length: int | None) -> None:
        self.prompt_length = length
        self._call_starts = length is not None  # the next forward is a generate() call's first

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.state = self.fwd = None

    # ------------------------------------------------------------------ inner model
    def _on_inner(self, module, args, kwargs):
        self._inner_mask = kwargs.get("attention_mask")
        self.last_origin = None
        call_starts, self._call_starts = self._call_starts, False
        past_key_values = cache_in(kwargs)
        _reject_static_cache(past_key_values)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past == 0:
            self._start_conversation(past_key_values)
            self._new_forward(args, kwargs, self.adapter.image_layout(kwargs), follow_up=False)
            return None
        self._continue_conversation(past_key_values)
        self.fwd = None
        if brings_images(kwargs):
            self._begin_follow_up(args, kwargs)
        elif self._starts_text_turn(args, kwargs, call_starts):
            self._record_text_turn(args, kwargs)
        elif self._position_shift is not None and kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = shifted(kwargs["position_ids"], self._position_shift)
        if self.state is None or not self.state.pruned:
            return args, kwargs
        if past < self.state.cache_len_layer0():  # the cache was cropped into the prompt
            self.state.drop_last(self.state.cache_len_layer0() - past)
        return self._continue_positions(args, kwargs, past)

    def _starts_text_turn(self, args, kwargs, call_starts: bool) -> bool:
        """Whether a forward without images on a non-empty cache starts a text-only follow-up turn rather
        than being a decode step: the first forward of a generate() call, or, outside generate(), a forward
        of more than one new token."""
        if self.prompt_length is not None:
            return call_starts
        return _new_tokens(args, kwargs).shape[1] > 1

    def _record_text_turn(self, args, kwargs) -> None:
        """Stats of a text-only follow-up turn: its new tokens, none visual, every layer saw them all."""
        batch, length = _new_tokens(args, kwargs).shape[:2]
        mask = kwargs.get("attention_mask")
        new_mask = mask[:, -length:] if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._record(unpruned_stats(new_mask, (batch, length), len(self.adapter.decoder_layers)))

    def _new_forward(self, args, kwargs, layout: ImageLayout | None, follow_up: bool) -> None:
        """Start the bookkeeping of a prefill (or a follow-up turn's new tokens) with images `layout`."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if layout is not None and input_ids is None:
            raise UnsupportedInputError(
                "tokprune needs input_ids (not only inputs_embeds) to find the image tokens"
            )
        if layout is not None:  # a forward tokprune may prune: its batches need padding masks
            check_mask_support(self.adapter.text_config)
        self.fwd = Forward(input_ids=input_ids, layout=layout, follow_up=follow_up)
        if runs_vision_tower(kwargs):
            self.store.clear()  # the vision tower runs inside this forward (else generate() ran it)

    def _continue_positions(self, args, kwargs, past: int):
        """Decode step (layer 0's cache holds `past` slots): track the original numbering; supply it if the
        caller passed no position ids. Counted from the cache length, so a cropped cache renumbers right."""
        state = self.state
        length = _new_tokens(args, kwargs).shape[1]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            steps = torch.arange(length, device=state.next_position.device)
            positions = state.positions_from(past)[:, None] + steps  # (B, n)
            rows = self.adapter.position_rows()
            kwargs["position_ids"] = positions if rows == 1 else positions[None].expand(rows, -1, -1)
            return args, kwargs
        state.next_position, state.positions_at = max_position(position_ids) + 1, past + length
        return None

    # ------------------------------------------------------------------ language model
    def _on_lm(self, module, args, kwargs):
        past_key_values = cache_in(kwargs)
        past = past_key_values.get_seq_length(0) if past_key_values is not None else 0
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):  # one mask per layer type, built by the inner model from its 2-D mask
            mask = self._inner_mask_2d(mask)
        self._inner_mask = {}  # used up: a direct call of the LM has no inner mask behind it
        if past > 0:
            self._continue_conversation(past_key_values)
            if self.fwd is not None and self.fwd.follow_up:
                return self._on_lm_follow_up(self.fwd, args, kwargs, past, mask)
            return self._on_lm_decode(args, kwargs, past, mask)
        if not self._started:  # the LM called directly, without the inner model
            self._start_conversation(past_key_values)
        self._started = False
        self._decode_tail = None
        fwd = self.fwd
        embeds = kwargs["inputs_embeds"]
        if (
            fwd is None
            or fwd.layout is None
            or fwd.input_ids is None
            or fwd.input_ids.shape != embeds.shape[:2]
        ):
            self.fwd = None
            self._record(unpruned_stats(mask, embeds.shape[:2], len(self.adapter.decoder_layers)))
            return None
        return self._on_lm_prefill(fwd, args, kwargs, mask)

    def _on_lm_prefill(self, fwd: Forward, args, kwargs, mask: torch.Tensor | None):
        """mask: (B, L) the 2-D padding mask of the new tokens (behind the LM's mask dict where the family
        builds one); a follow-up turn also has `fwd.prefix`, the mask of the cache it continues."""
        embeds = kwargs["inputs_embeds"]
        batch, length, _ = embeds.shape
        visual = self._map_tokens(fwd, mask)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = self._default_positions(batch, length, embeds.device, fwd.orig_past)
        fwd.stats.visual_in = visual.sum(1).tolist()
        fwd.stats.text_tokens = (fwd.tokens.valid & ~visual).sum(1).tolist()
        state = PrefillState(orig_len=fwd.orig_past + length, next_position=max_position(position_ids) + 1)
        changed = False
        if self.pre is not None:
            changed, mask, position_ids = self._pre_stage(fwd, kwargs, visual, mask, position_ids)
            if changed and self.positions == "contiguous":
                renumbered = max_position(position_ids) + 1
                self._position_shift = renumbered - state.next_position  # minus the dropped tokens, per row
                state.next_position = renumbered
        # the LLM input, or the cache it continues, is not the one its mask was given for
        if changed or fwd.prefix is not None:
            lm_mask = joined(fwd.prefix, mask)
            kwargs["attention_mask"] = self._lm_mask(
                kwargs.get("attention_mask"), lm_mask, kwargs["inputs_embeds"], cache_in(kwargs), fwd.tokens
            )
            state.lm_mask = lm_mask
            changed = True
        fwd.position_ids, fwd.mask_2d = position_ids, mask
        fwd.stats.input_order, fwd.stats.input_slots = fwd.tokens.visual_slots()
        instruction = text_after_images(fwd.tokens)
        fwd.stats.instruction_tokens = [int(p.numel()) for p in instruction]
        self._input_signals(fwd, kwargs["inputs_embeds"], instruction)
        fwd.entry_counts = content_counts(fwd.tokens, fwd.layout, fwd.image_rows)
        fwd.segments.append((0, fwd.tokens.real_tokens(), fwd.tokens.valid.shape[1]))
        self.state = state
        return (args, kwargs) if changed else None

    def _map_tokens(self, fwd: Forward, mask: torch.Tensor | None) -> torch.Tensor:
        """Fill in the forward's token map, image rows and counts, and the ViT signals in-LLM methods read;
        returns visual (B, L) bool, the image-token positions of the new tokens."""
        visual = self.adapter.visual_mask(fwd.input_ids)
        counts = fwd.layout.counts
        if int(visual.sum()) != sum(counts):
            raise UnsupportedInputError(
                f"the prompt holds {int(visual.sum())} image tokens but the images give {sum(counts)} features"
            )
        valid = mask.bool() if mask is not None else torch.ones_like(visual)
        # a follow-up turn passes only its new tokens to generate(), so the length counts those as well
        fwd.tokens = TokenMap.initial(visual, counts, valid, self.prompt_length)
        fwd.image_rows = image_rows(visual, counts)
        fwd.image_counts = content_counts(fwd.tokens, fwd.layout, fwd.image_rows)
        wanted = self._llm_vision_names()
        if wanted:
            fwd.vision_values = align_signals(
                {n: v for n, v in self.store.values.items() if n in wanted}, visual
            )
            fwd.visual_offsets = visual.sum(1).cumsum(0) - visual.sum(1)
        return visual

    def _pre_stage(self, fwd: Forward, kwargs, visual: torch.Tensor, mask, position_ids):
        """Run the pre-LLM method on the LLM input and compact it (kwargs updated in place).

        Returns (whether the input changed, the 2-D mask and the position ids of the LLM input)."""
        embeds = kwargs["inputs_embeds"]
        valid = fwd.tokens.valid
        with timed(fwd.seconds, embeds.device):
            values = self.store.values
            signals = {n: v for n, v in values.items() if n in self.pre.signals}
            instruction = None
            if "instruction" in self.pre.signals:
                text = text_after_images(fwd.tokens)
                instruction = [embeds[row, text[row]] for row in fwd.image_rows]
            features = values.get("features") if self.pre.features == "vision" else None
            if self.pre.features == "vision" and features is None:
                raise UnsupportedInputError(
                    f"{self.pre.name} works on the vision tower's features, but this forward brought none "
                    "(precomputed image features?); run the model on pixel values"
                )
            project = self.adapter.project if features is not None else None
            chosen = select_pre(
                self.pre, self.pre_budget, fwd.layout, embeds, visual, signals, instruction, features, project
            )
            keep, embeds = chosen.keep, chosen.embeds
            merged = rewritten_visual(kwargs["inputs_embeds"], embeds, fwd.tokens.visual_rank)
            extra = _rows_of(chosen.extra, visual, fwd.tokens.visual_rank)
            fwd.seconds[0] += self.store.seconds[0]
            self.store.seconds[0] = 0.0  # the signals stay: generate(use_cache=False) reuses them
        changed = keep is not None
        if changed:
            self.adapter.compact_lm_kwargs(kwargs, keep & valid, visual)
            key = selection_key(fwd.tokens, visual, chosen.emission) if self.order == "selection" else None
            compaction = Compaction.from_keep(keep & valid, key)
            fwd.tokens = fwd.tokens.take(compaction)
            kwargs["inputs_embeds"] = compaction.take(embeds)
            mask = compaction.take_mask(mask)
            position_ids = compaction.take_positions(position_ids)
            if self.positions == "contiguous":
                position_ids = contiguous_positions(mask, self.adapter.position_rows())
            kwargs["position_ids"] = position_ids
        order = fwd.tokens.visual_slots()[0]
        stage = StageStats.of(self.pre.name, "pre", fwd.tokens.kept_visual(), merged, extra, order)
        fwd.stats.stages.append(stage)
        return changed, mask, position_ids

    def _input_signals(self, fwd: Forward, embeds: torch.Tensor, instruction: list[torch.Tensor]) -> None:
        """The signals in-LLM methods read from the LLM input embeds (B, L, D), as it enters the decoder;
        instruction: per row, the positions of its instruction in embeds."""
        wanted = {n for m, _ in self.llm for n in m.signals if n in INPUT_SIGNALS}
        for name in sorted(wanted):
            with timed(fwd.seconds, embeds.device):
                fwd.input_values[name] = INPUT_SIGNALS[name](embeds, fwd.tokens.image_id, instruction)

    def _default_positions(self, batch: int, length: int, device, start: int = 0) -> torch.Tensor:
        positions = torch.arange(start, start + length, device=device)[None].expand(batch, -1)
        rows = self.adapter.position_rows()
        return positions if rows == 1 else positions[None].expand(rows, -1, -1)

    def _on_lm_decode(self, args, kwargs, past: int, mask: torch.Tensor | None):
        state = self.state
        self._decode_masks.clear()
        if state is None or not state.pruned:
            return None
        embeds = kwargs["inputs_embeds"]
        batch, length, _ = embeds.shape
        n_after = past + length - state.cache_len_layer0()  # tokens after the prompt, this step included
        if mask is None:
            tail = torch.ones(batch, n_after, dtype=torch.long, device=embeds.device)
        elif mask.shape[1] == state.orig_len + n_after:
            tail = mask[:, state.orig_len :]
        else:
            raise UnsupportedInputError(
                f"attention_mask has {mask.shape[1]} columns but the unpruned sequence so far has "
                f"{state.orig_len + n_after}: pass the mask of the full (unpruned) conversation"
            )
        self._decode_tail = tail
        if state.lm_mask is None:
            return None
        mask_2d = joined(state.lm_mask, tail)
        kwargs["attention_mask"] = self._lm_mask(
            kwargs.get("attention_mask"), mask_2d, embeds, cache_in(kwargs), None
        )
        return args, kwargs

    def _inner_mask_2d(self, given: dict) -> torch.Tensor | None:
        """The 2-D mask behind the per-layer-type mask dict `given` to the LM: the inner model's."""
        if isinstance(self._inner_mask, dict):
            raise UnsupportedInputError(
                f"the language model got pre-built attention masks ({', '.join(given)}) but the model was not "
                "given a 2-D attention_mask to prune along; pass a 2-D attention_mask (and the default cache)"
            )
        return self._inner_mask

    def _lm_mask(self, given, mask_2d: torch.Tensor, hidden: torch.Tensor, pkv, tokens: TokenMap | None):
        """The LM's mask argument for the compacted 2-D mask (B, L): the 2-D mask itself, or, where the
        LM was `given` a dict per layer type, that dict rebuilt by the adapter (tokens: None in decode)."""
        if not isinstance(given, dict):
            return mask_2d
        first = self._first_layers(0)
        return {
            kind: self.adapter.layer_mask(hidden, mask_2d, pkv, i, kind, tokens) for kind, i in first.items()
        }

    def _on_lm_done(self, module, args, output):
        keep_on(output_cache(output) if hasattr(output, "items") else None, self.key, self.conv)
        fwd = self.fwd
        if fwd is None or fwd.tokens is None:
            return None
        self._finish(fwd)
        return None

    def _finish(self, fwd: Forward) -> None:
        self._record(fwd.finished_stats(len(self.adapter.decoder_layers)))
        self.last_origin = fwd.tokens.origin if fwd.tokens.compacted else None
        self.fwd = None


def _new_tokens(args, kwargs) -> torch.Tensor:
    """The forward's new tokens: input_ids (B, L), else inputs_embeds (B, L, D)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    return input_ids if input_ids is not None else kwargs["inputs_embeds"]


def _families_with_features() -> list[str]:
    from tokprune.patches import ADAPTERS

    return [adapter.family for adapter in ADAPTERS if "features" in adapter.feature_signals]


def contiguous_positions(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """Position ids 0, 1, ... over each row's real tokens of a 2-D mask (B, L), what the authors' LLaVA code
    gives the sequence it builds (padding: 1, as generate() does); (rows, B, L) for M-RoPE layouts."""
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return positions if rows == 1 else positions[None].expand(rows, -1, -1)


def _rows_of(
    flags: torch.Tensor | None, visual: torch.Tensor, visual_rank: torch.Tensor
) -> list[torch.Tensor] | None:
    """Per row, the sorted visual-token indices whose flag (N_visual,) in masked_scatter order is set."""
    if flags is None:
        return None
    per_row = torch.zeros(visual.shape, dtype=torch.bool, device=visual.device)
    per_row[visual] = flags
    return flagged_visual(per_row, visual_rank)


def _reject_static_cache(past_key_values) -> None:
    static = {"StaticCache", "HybridCache", "SlidingWindowCache"}
    if past_key_values is not None and type(past_key_values).__name__ in static:
        raise UnsupportedInputError(
            f"{type(past_key_values).__name__} is not supported (pruned caches change length); use the default DynamicCache"
        )
