"""One forward in flight through the engine: its images, token map, current-stage tensors and stats."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokprune.core.compaction import Compaction
from tokprune.core.layout import ImageLayout
from tokprune.core.masks import joined
from tokprune.core.state import PrefillState, TokenMap
from tokprune.core.stats import PruneStats


@dataclass
class Forward:
    """A prefill in flight: the image layout, the current token map and the LLM-side tensors of the
    current stage (RoPE tables, position ids, 2-D mask, per-layer-type 4-D masks), the signals of
    pending stage boundaries, and `segments`: (first layer, real tokens per row, padded length) of
    every stretch of layers that saw the same tokens."""

    input_ids: torch.Tensor | None
    layout: ImageLayout | None
    # a follow-up turn on a reused KV cache: the 2-D mask of what layer 0's cache holds (earlier turns as
    # they were pruned), the unpruned length and 2-D mask of that conversation, and what the last pruned
    # forward before it left behind; None / 0 for a fresh prefill
    prefix: torch.Tensor | None = None
    orig_past: int = 0
    unpruned_prefix: torch.Tensor | None = None
    earlier: PrefillState | None = None
    follow_up: bool = False
    tokens: TokenMap | None = None
    image_rows: list[int] = field(default_factory=list)
    entry_counts: list[int] = field(default_factory=list)  # per image, content tokens entering the LLM
    image_counts: list[int] = field(default_factory=list)  # per image, content tokens before any pruning
    # ViT signals in-LLM methods read, (N_visual, ...) in masked_scatter order, and each row's first index
    vision_values: dict[str, torch.Tensor] = field(default_factory=dict)
    visual_offsets: torch.Tensor | None = None
    # signals computed once on the LLM input (`signals.llm.INPUT_SIGNALS`), (B, L_input, ...)
    input_values: dict[str, torch.Tensor] = field(default_factory=dict)
    # per layer type (one RoPE table per type: Gemma 3's global and local bases), over the current sequence
    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    source: Compaction | None = None  # the in-LLM compactions so far, composed (indexes the LM input)
    position_ids: torch.Tensor | None = None
    mask_2d: torch.Tensor | None = None
    layer_masks: dict[str, object] = field(default_factory=dict)
    llm_signals: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    segments: list[tuple[int, list[int], int]] = field(default_factory=list)
    stats: PruneStats = field(default_factory=PruneStats)
    seconds: list[float] = field(default_factory=lambda: [0.0])

    def cache_mask_at(self, layer: int) -> torch.Tensor:
        """A follow-up turn: (B, P) 2-D mask of the earlier turns in the cache of `layer`: the last pruned
        prompt as that layer's stage left it, then the unpruned mask of the tokens after it."""
        pruned = self.earlier.mask_at(layer) if self.earlier is not None else None
        if pruned is None:
            return self.unpruned_prefix
        tail = self.unpruned_prefix[:, self.earlier.orig_len :]
        return joined(pruned, tail)

    def finished_stats(self, num_layers: int) -> PruneStats:
        """The forward's stats, completed: kept sets, scoring time and the tokens every layer saw."""
        stats = self.stats
        stats.kept = self.tokens.kept_visual()
        stats.visual_kept = [int(k.numel()) for k in stats.kept]
        stats.scoring_seconds = self.seconds[0]
        bounds = [start for start, _, _ in self.segments[1:]] + [num_layers]
        stats.layer_tokens = [[] for _ in stats.visual_in]
        for (start, real, padded), end in zip(self.segments, bounds):
            stats.layer_lengths += [padded] * (end - start)
            for row, n in enumerate(real):
                stats.layer_tokens[row] += [n] * (end - start)
        return stats
