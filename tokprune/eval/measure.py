"""What the plugin reports per request: time to first token, visual tokens in / kept, prefill FLOPs.

The numbers go to lmms-eval's `results["throughput"]` (through `gen_metrics.log_metrics`, one entry per
request, so its `avg_<key>` values are per-request means) and to `results["efficiency"]` (through the
`TokenCounts` of each `GenerationResult`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessor

from tokprune.core.stats import PruneStats


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock readings include it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FirstTokenClock(LogitsProcessor):
    """A generate() logits processor that notes when the prefill's logits are ready (first call).

    `ttft(start)` is then the time to first token of every row in the batch: vision encoder, token
    scoring and selection, and the LLM prefill (preprocessing excluded).
    """

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            synchronize(scores.device)
            self.first = time.perf_counter()
        return scores

    def ttft(self, start: float) -> float:
        return (self.first if self.first is not None else time.perf_counter()) - start


@dataclass
class RowReport:
    """One request's measurements.

    ttft_s: time to first token of the batch the request ran in. elapsed_s: its share of the batch's
    wall time (batch time / rows, so sums over requests are exact). visual_in / visual_kept: visual
    tokens before pruning / after the final stage; visual_layer_avg: Σ (L_{i+1} − L_i)·T_i / L.
    llm_input_tokens: prompt tokens the first LLM layer processed. prefill_flops / scoring_flops: the
    request's share of the batch's analytic prefill FLOPs (`tokprune.flops`, model + scoring) and of the
    scoring part alone; None where the model family has no FLOPs model.
    """

    ttft_s: float
    elapsed_s: float
    output_tokens: int
    visual_in: int
    visual_kept: int
    visual_layer_avg: float
    llm_input_tokens: int
    prefill_flops: float | None
    scoring_flops: float | None
    scoring_s: float

    def throughput_entry(self) -> dict[str, float]:
        """The additional_metrics for `gen_metrics.log_metrics` (numbers only; None values left out)."""
        entry = {
            "total_requests": 1,
            "ttft_s": self.ttft_s,
            "visual_tokens_in": self.visual_in,
            "visual_tokens_kept": self.visual_kept,
            "visual_tokens_layer_avg": self.visual_layer_avg,
            "llm_input_tokens": self.llm_input_tokens,
            "scoring_s": self.scoring_s,
        }
        if self.prefill_flops is not None:
            entry.update(prefill_flops=self.prefill_flops, scoring_flops=self.scoring_flops)
        return entry


def visual_counts(model: nn.Module, inputs: dict) -> list[int]:
    """Visual tokens per row of a processor output (placeholders of the model's image token)."""
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        token = getattr(model.config, "image_token_index", None)
    if token is None:
        return [0] * inputs["input_ids"].shape[0]
    return (inputs["input_ids"] == token).sum(1).tolist()


def prefill_flops(
    model: nn.Module, inputs: dict, stats: PruneStats | None, pruner
) -> tuple[float, float] | None:
    """(total, scoring) analytic FLOPs of the batch's prefill, or None for an unsupported family."""
    from tokprune import flops

    if not flops.supports(model):
        return None
    signals = flops.scoring_signals(pruner) if pruner is not None else ()
    breakdown = flops.prefill_flops(model, inputs, stats, logits_to_keep=1, signals=signals)
    return breakdown.total, breakdown.scoring


def row_reports(
    model: nn.Module,
    inputs: dict,
    pruner,
    *,
    ttft_s: float,
    elapsed_s: float,
    output_tokens: list[int],
) -> list[RowReport]:
    """One `RowReport` per batch row of a prefill that just ran (with `pruner` active, or None)."""
    stats = pruner.stats if pruner is not None else None
    rows = inputs["input_ids"].shape[0]
    visual_in = visual_counts(model, inputs)
    real = (
        inputs["attention_mask"].sum(1).tolist()
        if "attention_mask" in inputs
        else [inputs["input_ids"].shape[1]] * rows
    )
    total = prefill_flops(model, inputs, stats, pruner)
    reports = []
    for b in range(rows):
        reports.append(
            RowReport(
                ttft_s=ttft_s,
                elapsed_s=elapsed_s / rows,
                output_tokens=output_tokens[b],
                visual_in=stats.visual_in[b] if stats else visual_in[b],
                visual_kept=stats.visual_kept[b] if stats else visual_in[b],
                visual_layer_avg=stats.layer_averaged_visual(b) if stats else float(visual_in[b]),
                llm_input_tokens=stats.layer_tokens[b][0] if stats else int(real[b]),
                prefill_flops=None if total is None else total[0] / rows,
                scoring_flops=None if total is None else total[1] / rows,
                scoring_s=(stats.scoring_seconds / rows) if stats else 0.0,
            )
        )
    return reports
