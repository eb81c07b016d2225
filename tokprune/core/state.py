"""Bookkeeping of one prefill: which image each current token belongs to, and the masks decode needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokprune.core.compaction import Compaction


@dataclass
class TokenMap:
    """Identity of every slot of the current (possibly compacted) sequence, all (B, L_cur).

    image_id: global image index of a visual token, -1 for text and padding.
    visual_rank: index of a visual token in its row's visual-token order, -1 otherwise.
    valid: True for real tokens (False for padding).
    origin: position of the slot's token in the forward's input_ids (-1 for the padding compaction adds).
    instruction_start: (B,) the input position after each row's last visual token (0 without any): the
    row's instruction is its prompt text from there on, however many of the visual tokens are left.
    prompt_length: where the prompt ends in input_ids when tokens follow it in the same forward (the drafts
    an assisted generate() verifies in its prefill; with use_cache=False, the tokens generated so far);
    None = every real token is the prompt's.
    """

    image_id: torch.Tensor
    visual_rank: torch.Tensor
    valid: torch.Tensor
    origin: torch.Tensor
    instruction_start: torch.Tensor
    prompt_length: int | None = None

    @classmethod
    def initial(
        cls, visual: torch.Tensor, counts: list[int], valid: torch.Tensor, prompt_length: int | None = None
    ) -> TokenMap:
        """visual: (B, L) bool placeholder positions; counts: tokens per image in masked_scatter order."""
        image_id = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
        ids = torch.arange(len(counts), device=visual.device)
        image_id[visual] = ids.repeat_interleave(torch.tensor(counts, device=visual.device))
        rank = (visual.long().cumsum(1) - 1).masked_fill(~visual, -1)
        origin = torch.arange(visual.shape[1], device=visual.device).expand(visual.shape).clone()
        start = torch.where(visual, origin, -1).amax(1) + 1
        return cls(
            image_id=image_id, visual_rank=rank, valid=valid, origin=origin, instruction_start=start,
            prompt_length=prompt_length,
        )  # fmt: skip

    def take(self, compaction: Compaction) -> TokenMap:
        """The map of the compacted sequence (padding slots: -1 / invalid)."""
        pad = ~compaction.valid
        return TokenMap(
            image_id=compaction.take(self.image_id).masked_fill(pad, -1),
            visual_rank=compaction.take(self.visual_rank).masked_fill(pad, -1),
            valid=compaction.valid.clone(),
            origin=compaction.take(self.origin).masked_fill(pad, -1),
            instruction_start=self.instruction_start,
            prompt_length=self.prompt_length,
        )

    @property
    def prompt(self) -> torch.Tensor:
        """(B, L_cur) bool: the prompt's real tokens, what text signals read (not the tokens after it)."""
        if self.prompt_length is None:
            return self.valid
        return self.valid & (self.origin < self.prompt_length)

    @property
    def compacted(self) -> bool:
        """Whether any token was dropped (the slots no longer are the input's positions in order)."""
        identity = torch.arange(self.origin.shape[1], device=self.origin.device)
        return not bool((self.origin == identity).all())

    def real_tokens(self) -> list[int]:
        return self.valid.sum(1).tolist()

    def visual_slots(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per row: (the visual-token indices present, in slot order; the slots that hold them)."""
        slots = [(rank >= 0).nonzero().squeeze(1) for rank in self.visual_rank]
        return [rank[s] for rank, s in zip(self.visual_rank, slots)], slots

    def kept_visual(self) -> list[torch.Tensor]:
        """Per row: sorted visual-token indices still present."""
        return [r[r >= 0].sort().values for r in self.visual_rank]


@dataclass
class PrefillState:
    """What a prefill leaves behind for the decode steps that follow it.

    orig_len: the unpruned prompt length (what generate()'s 2-D mask counts).
    lm_mask: (B, L0) 2-D mask the LLM input was compacted to (None: the LLM input was not changed).
    stage_masks: boundary layer -> (B, L_s) 2-D mask of the cache of layers >= that boundary.
    next_position: (B,) the original position of the token that follows the first `positions_at` slots of
    layer 0's cache (for loops passing no position_ids); positions_at: None = right after the prompt.
    """

    orig_len: int
    lm_mask: torch.Tensor | None = None
    stage_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    next_position: torch.Tensor | None = None
    positions_at: int | None = None
    # boundary -> (B,) what a decode step adds to the LM's position ids in layers >= that boundary, where an
    # in-LLM stage renumbered the sequence (`apply(positions="contiguous")`)
    stage_shifts: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def pruned(self) -> bool:
        return self.lm_mask is not None or bool(self.stage_masks)

    def stage_at(self, layer: int) -> int | None:
        """The boundary of the last stage that pruned the cache of `layer` (None: none did)."""
        stages = [b for b in self.stage_masks if b <= layer]
        return max(stages) if stages else None

    def mask_at(self, layer: int) -> torch.Tensor | None:
        """(B, L) 2-D mask of the prompt in the cache of `layer`; None where it was not pruned."""
        stage = self.stage_at(layer)
        return self.stage_masks[stage] if stage is not None else self.lm_mask

    def shift_at(self, layer: int) -> torch.Tensor | None:
        """(B,) the renumbering shift of `layer`'s positions in decode steps (None: none)."""
        stages = [b for b in self.stage_shifts if b <= layer]
        return self.stage_shifts[max(stages)] if stages else None

    def cache_len_layer0(self) -> int:
        return self.lm_mask.shape[1] if self.lm_mask is not None else self.orig_len

    def positions_from(self, past: int) -> torch.Tensor:
        """(B,) the original position of the next token when layer 0's cache holds `past` slots."""
        at = self.positions_at if self.positions_at is not None else self.cache_len_layer0()
        return self.next_position + (past - at)

    def drop_last(self, n: int) -> None:
        """The cache lost the prompt's last `n` tokens (generate() cropped rejected draft tokens that were
        verified in the prefill itself). They are text after the images, the last `n` slots of every layer."""
        self.lm_mask = self.lm_mask[:, :-n] if self.lm_mask is not None else None
        self.stage_masks = {b: mask[:, :-n] for b, mask in self.stage_masks.items()}
        self.orig_len -= n


def max_position(position_ids: torch.Tensor) -> torch.Tensor:
    """(B,) largest position of each row, over M-RoPE rows too."""
    flat = position_ids if position_ids.dim() == 2 else position_ids.amax(0)
    return flat.amax(1)
