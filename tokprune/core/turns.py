"""Follow-up turns on a reused KV cache: a forward on a non-empty cache that brings images is pruned like
a prefill, against the mask of the cache the earlier turns were pruned to (a mixin of `Engine`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokprune.core.compat import cache_in
from tokprune.core.forward import Forward
from tokprune.core.positions import first_position, with_rows
from tokprune.core.state import PrefillState
from tokprune.errors import UnsupportedInputError

if TYPE_CHECKING:
    from tokprune.patches import Adapter


class FollowUpHooks:
    """The follow-up half of the engine: numbering and masks of a new turn (`Engine` owns the state and
    calls these from its inner-model and language-model hooks)."""

    adapter: Adapter
    fwd: Forward | None
    state: PrefillState | None
    _position_shift: torch.Tensor | None
    positions: str

    def _begin_follow_up(self, args, kwargs) -> None:
        """A forward on a non-empty cache that brings images: a follow-up turn whose new images are pruned
        as in a prefill (the earlier turns keep the cache they were pruned to)."""
        layout = self.adapter.image_layout(kwargs)
        if layout is None:
            return
        if self.positions == "contiguous":
            raise UnsupportedInputError(
                "positions='contiguous' reproduces the authors' single-prompt pipeline; a follow-up turn that "
                "brings images on a reused cache has no contiguous numbering there. Re-run the whole "
                "conversation as one prompt (no cache), or use positions='original' (the default)"
            )
        self._new_forward(args, kwargs, layout, follow_up=True)
        self._renumber_follow_up(kwargs)

    def _renumber_follow_up(self, kwargs) -> None:
        """Give the follow-up turn the positions the whole conversation would (the adapter's, where
        transformers numbers a continued turn otherwise) and keep the shift for the steps after it."""
        input_ids, given, mask = self.fwd.input_ids, kwargs.get("position_ids"), kwargs.get("attention_mask")
        length = input_ids.shape[1]
        mask = self._conversation_mask(mask, cache_in(kwargs).get_seq_length(), input_ids)
        first = first_position(given, mask, length, getattr(self.adapter.inner, "rope_deltas", None))
        shift = self._position_shift if self._position_shift is not None else torch.zeros_like(first)
        rows = self.adapter.follow_up_positions(kwargs, input_ids, mask[:, -length:], first + shift)
        if rows is None:
            return
        kwargs["position_ids"] = with_rows(given, rows)
        transformers_next = first + mask[:, -length:].long().sum(1)  # how transformers numbers the next token
        self._position_shift = rows.amax(0).amax(1) + 1 - transformers_next

    def _on_lm_follow_up(self, fwd: Forward, args, kwargs, past: int, mask: torch.Tensor | None):
        """New tokens of a follow-up turn on a cache of `past` slots (layer 0): their images are pruned like
        a prefill's, and the LLM attends to the cache through the mask it was pruned to.

        mask: (B, P + L) 2-D mask of the whole unpruned conversation (P tokens before this turn's L), as
        generate() carries it; None = no padding anywhere."""
        embeds = kwargs["inputs_embeds"]
        length = embeds.shape[1]
        if fwd.input_ids.shape != embeds.shape[:2]:
            raise UnsupportedInputError("the new turn's input_ids and inputs_embeds differ in shape")
        orig_past = self._unpruned_length(past)
        mask = self._conversation_mask(mask, past, fwd.input_ids)
        if mask.shape[1] != orig_past + length:
            raise UnsupportedInputError(
                f"attention_mask has {mask.shape[1]} columns but the unpruned conversation with this turn has "
                f"{orig_past + length}: pass only the new tokens as input_ids and the mask of the whole "
                "(unpruned) conversation"
            )
        fwd.orig_past, fwd.unpruned_prefix, fwd.earlier = orig_past, mask[:, :orig_past], self.state
        fwd.prefix = fwd.cache_mask_at(0)
        return self._on_lm_prefill(fwd, args, kwargs, mask[:, orig_past:])

    def _conversation_mask(self, mask, past: int, new_ids: torch.Tensor) -> torch.Tensor:
        """(B, P + L) 2-D mask of the whole unpruned conversation with the new tokens `new_ids` (B, L) on a
        cache of `past` slots: `mask` itself, or all ones where none was given (no padding anywhere)."""
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
        batch, length = new_ids.shape
        columns = self._unpruned_length(past) + length
        return torch.ones(batch, columns, dtype=torch.long, device=new_ids.device)

    def _unpruned_length(self, past: int) -> int:
        """The unpruned length of a conversation whose cache holds `past` slots (at layer 0)."""
        state = self.state
        return past if state is None else state.orig_len + past - state.cache_len_layer0()
