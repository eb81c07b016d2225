"""What the most recent prefill did (decode steps never prune)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StageStats:
    """One pruning stage: where it acted, the visual tokens left per batch row after it, and which of them
    it rewrote.

    kept[b]: sorted LongTensor of the visual-token indices (row b's visual-token order) left after the stage.
    merged[b]: sorted LongTensor, a subset of kept[b]: the tokens whose vector the stage replaced (the merged
        embeddings / hidden states of merging methods); empty for pure pruning.
    extra[b]: sorted LongTensor, a subset of merged[b]: the slots that carry an extra token (a [CLS] or
        summary token, `Selection.extra`) rather than their own patch, whose patch is therefore dropped.
    order[b]: kept[b] in the order the layers after the stage hold them (`kept[b]` itself unless
        `apply(order="selection")` laid them out in the method's emission order).
    """

    method: str
    where: str  # "pre" or "llm@<first layer that sees the reduced set>"
    visual_kept: list[int]
    kept: list[torch.Tensor] = field(default_factory=list)
    merged: list[torch.Tensor] = field(default_factory=list)
    extra: list[torch.Tensor] = field(default_factory=list)
    order: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        method: str,
        where: str,
        kept: list[torch.Tensor],
        merged: list[torch.Tensor] | None = None,
        extra: list[torch.Tensor] | None = None,
        order: list[torch.Tensor] | None = None,
    ) -> StageStats:
        """merged / extra: per row, the rewritten visual-token indices / those carrying an extra token (None:
        none); order: per row, the kept ones in the order later layers hold them (None: kept)."""
        empty = [k[:0] for k in kept]
        return cls(
            method,
            where,
            [int(k.numel()) for k in kept],
            kept,
            merged or empty,
            extra or empty,
            order or kept,
        )

    @property
    def patches(self) -> list[torch.Tensor]:
        """Per row: the kept visual tokens that carry their own patch (kept minus extra)."""
        return [k[~torch.isin(k, e)] for k, e in zip(self.kept, self.extra)]


def rewritten_visual(
    before: torch.Tensor, after: torch.Tensor, visual_rank: torch.Tensor
) -> list[torch.Tensor]:
    """Per row: the sorted visual-token indices whose vector a stage replaced.

    before / after: (B, L, D) the sequence a stage received and the one it hands on, before compaction
    (`after is before` when the stage merged nothing); visual_rank: (B, L) visual-token index of every slot,
    -1 for text and padding. A merged vector equal to the token's own counts as not rewritten.
    """
    if after is before:
        return [r[:0] for r in visual_rank]
    changed = (after != before).any(-1) & (visual_rank >= 0)
    return [rank[row].sort().values for rank, row in zip(visual_rank, changed)]


@dataclass
class PruneStats:
    """Per batch row: visual tokens in and kept, the kept indices, and the tokens every LLM layer saw.

    visual_in[b] / visual_kept[b]: visual tokens of row b before pruning / after the final stage.
    text_tokens[b]: real non-visual tokens of row b (never pruned).
    instruction_tokens[b]: of those, the instruction (the prompt's text after the row's last image), the
             queries of the text-query signals.
    kept[b]: sorted LongTensor of the indices, in row b's visual-token order, of the visual tokens that
             survived the final stage.
    input_order[b]: the visual-token indices of row b's LLM input, in the order the LLM receives them (the
             pre-LLM stage's survivors; `kept` sorted unless `apply(order="selection")` reordered them).
    input_slots[b]: (same length) the slot of each of them in row b's LLM input sequence (padding included).
    layer_tokens[b][i]: real (non-padding) tokens decoder layer i processed in row b.
    layer_lengths[i]: padded sequence length of decoder layer i (the batch's max over rows).
    scoring_seconds: wall time spent computing signals and selecting (ViT hooks + LLM hooks).
    """

    visual_in: list[int] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)
    instruction_tokens: list[int] = field(default_factory=list)
    visual_kept: list[int] = field(default_factory=list)
    kept: list[torch.Tensor] = field(default_factory=list)
    input_order: list[torch.Tensor] = field(default_factory=list)
    input_slots: list[torch.Tensor] = field(default_factory=list)
    layer_tokens: list[list[int]] = field(default_factory=list)
    layer_lengths: list[int] = field(default_factory=list)
    scoring_seconds: float = 0.0
    stages: list[StageStats] = field(default_factory=list)

    def layer_averaged_visual(self, row: int = 0) -> float:
        """Layer-averaged visual-token count of a row, sum_i (L_{i+1} - L_i) * T_i / L (DESIGN §6)."""
        tokens = self.layer_tokens[row]
        return sum(t - self.text_tokens[row] for t in tokens) / len(tokens)


def unpruned_stats(mask: torch.Tensor | None, shape: tuple[int, int], num_layers: int) -> PruneStats:
    """The stats of a prefill that brought no images to prune (a text-only prompt): no visual tokens, every
    layer saw every real token. mask: (B, L) 2-D padding mask or None (no padding); shape: (B, L)."""
    batch, length = shape
    two_d = isinstance(mask, torch.Tensor) and mask.dim() == 2
    real = mask.bool().sum(1).tolist() if two_d else [length] * batch
    return PruneStats(
        visual_in=[0] * batch,
        text_tokens=list(real),
        instruction_tokens=[0] * batch,
        visual_kept=[0] * batch,
        kept=[torch.zeros(0, dtype=torch.long) for _ in range(batch)],
        input_order=[torch.zeros(0, dtype=torch.long) for _ in range(batch)],
        input_slots=[torch.zeros(0, dtype=torch.long) for _ in range(batch)],
        layer_tokens=[[n] * num_layers for n in real],
        layer_lengths=[length] * num_layers,
    )
