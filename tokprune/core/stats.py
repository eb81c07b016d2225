"""What the most recent prefill did (decode steps never prune)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StageStats:
    """One pruning stage: where it acted and the visual tokens left per batch row after it."""

    method: str
    where: str  # "pre" or "llm@<first layer that sees the reduced set>"
    visual_kept: list[int]
    kept: list[torch.Tensor] = field(default_factory=list)  # per row, sorted visual-token indices left

    @classmethod
    def of(cls, method: str, where: str, kept: list[torch.Tensor]) -> StageStats:
        return cls(method, where, [int(k.numel()) for k in kept], kept)


@dataclass
class PruneStats:
    """Per batch row: visual tokens in and kept, the kept indices, and the tokens every LLM layer saw.

    visual_in[b] / visual_kept[b]: visual tokens of row b before pruning / after the final stage.
    text_tokens[b]: real non-visual tokens of row b (never pruned).
    instruction_tokens[b]: of those, the instruction (the prompt's text after the row's last image), the
             queries of the text-query signals.
    kept[b]: sorted LongTensor of the indices, in row b's visual-token order, of the visual tokens that
             survived the final stage.
    layer_tokens[b][i]: real (non-padding) tokens decoder layer i processed in row b.
    layer_lengths[i]: padded sequence length of decoder layer i (the batch's max over rows).
    scoring_seconds: wall time spent computing signals and selecting (ViT hooks + LLM hooks).
    """

    visual_in: list[int] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)
    instruction_tokens: list[int] = field(default_factory=list)
    visual_kept: list[int] = field(default_factory=list)
    kept: list[torch.Tensor] = field(default_factory=list)
    layer_tokens: list[list[int]] = field(default_factory=list)
    layer_lengths: list[int] = field(default_factory=list)
    scoring_seconds: float = 0.0
    stages: list[StageStats] = field(default_factory=list)

    def layer_averaged_visual(self, row: int = 0) -> float:
        """Layer-averaged visual-token count of a row, sum_i (L_{i+1} - L_i) * T_i / L (DESIGN §6)."""
        tokens = self.layer_tokens[row]
        return sum(t - self.text_tokens[row] for t in tokens) / len(tokens)
