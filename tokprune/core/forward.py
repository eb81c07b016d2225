"""One forward in flight through the engine: its images, token map, current-stage tensors and stats."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokprune.core.compaction import Compaction
from tokprune.core.layout import ImageLayout
from tokprune.core.state import TokenMap
from tokprune.core.stats import PruneStats


@dataclass
class Forward:
    """A prefill in flight: the image layout, the current token map and the LLM-side tensors of the
    current stage (RoPE tables, position ids, 2-D mask, per-layer-type 4-D masks), the signals of
    pending stage boundaries, and `segments`: (first layer, real tokens per row, padded length) of
    every stretch of layers that saw the same tokens."""

    input_ids: torch.Tensor | None
    layout: ImageLayout | None
    # a follow-up turn on a reused KV cache: the 2-D mask of what the cache holds (earlier turns as they
    # were pruned) and the unpruned length of that conversation; None / 0 for a fresh prefill
    prefix: torch.Tensor | None = None
    orig_past: int = 0
    # a follow-up turn: boundary -> 2-D mask of what the cache of layers >= that boundary holds
    stage_prefixes: dict[int, torch.Tensor] = field(default_factory=dict)
    follow_up: bool = False
    tokens: TokenMap | None = None
    image_rows: list[int] = field(default_factory=list)
    entry_counts: list[int] = field(default_factory=list)  # per image, content tokens entering the LLM
    image_counts: list[int] = field(default_factory=list)  # per image, content tokens before any pruning
    # ViT signals in-LLM methods read, (N_visual, ...) in masked_scatter order, and each row's first index
    vision_values: dict[str, torch.Tensor] = field(default_factory=dict)
    visual_offsets: torch.Tensor | None = None
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
        """A follow-up turn: the 2-D mask of the earlier turns in the cache of `layer`."""
        stages = [b for b in self.stage_prefixes if b <= layer]
        return self.stage_prefixes[max(stages)] if stages else self.prefix

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


def cache_mask(
    pruned: torch.Tensor | None, unpruned: torch.Tensor, tail: torch.Tensor | None
) -> torch.Tensor:
    """2-D mask of a cache: the prompt of the last pruned forward as it was pruned (`pruned`, with `tail`,
    the unpruned mask of the tokens after it, appended), or, where nothing was pruned, `unpruned`."""
    if pruned is None:
        return unpruned
    return pruned if tail is None else torch.cat([pruned, tail.to(pruned.dtype)], dim=1)
