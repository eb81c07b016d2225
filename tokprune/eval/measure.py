"""What the plugin reports per request: latency, time to first token, visual tokens in / kept, FLOPs.

Every request (a generate_until or loglikelihood request, or one round of a multi-round one) logs one
entry through `gen_metrics.log_metrics`; lmms-eval sums / averages the entries into
`results["throughput"]`. HF `generate()` returns all rows of a batch together, so a request's latency is
its batch's. With `batch_size=B` the keys mean:

    total_gen_tokens      generated tokens, all requests
    total_elapsed_time    sum of the requests' latencies (lmms-eval: "sum of generation latencies"): a
                          batch's wall time counts once per request in it, B times
    avg_latency           mean request latency: start of its batch's generate() (or prefill) until its
                          answer (or its continuation's last logits) is there
    avg_speed             total_gen_tokens / total_elapsed_time: generated tokens per second of a
                          request's latency (the speed one request sees, not the batch's throughput)
    avg_batch_ttft_s      mean over requests of the time to first token of the batch it ran in (vision
                          encoder, scoring, LLM prefill of all B rows); <= avg_latency
    avg_batch_scoring_s   mean over requests of its batch's token scoring and selection time; part of
                          the batch's time to first token
    avg_wall_share_s      generation wall time per request (batch wall time / B): throughput is
                          1 / avg_wall_share_s requests per second, and total_gen_tokens /
                          (avg_wall_share_s * requests) generated tokens per second
    avg_visual_tokens_in / _kept / _layer_avg, avg_llm_input_tokens
                          per request: visual tokens before pruning / after the final stage / averaged
                          over the LLM's layers, and the prompt tokens the first LLM layer processed
    avg_prefill_flops / avg_scoring_flops
                          analytic prefill FLOPs per request (`tokprune.flops`, model + scoring; a batch's
                          total split evenly over its rows) and their scoring part; absent where the
                          model family has no FLOPs model

With B = 1 the batch keys are the request's own (latency = its wall share). Token counts also go to
`results["efficiency"]` (through the `TokenCounts` of each `GenerationResult`).
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
    """One request's measurements (see the module docstring for what lmms-eval makes of them).

    batch_ttft_s: time to first token of the batch the request ran in. latency_s: the batch's wall time
    (start of generate() or of the prefill until the outputs are there). wall_share_s: latency_s / rows.
    visual_in / visual_kept: visual tokens before pruning / after the final stage; visual_layer_avg:
    Σ (L_{i+1} − L_i)·T_i / L. llm_input_tokens: prompt tokens the first LLM layer processed.
    prefill_flops / scoring_flops: the batch's analytic prefill FLOPs (`tokprune.flops`, model + scoring)
    and their scoring part, divided by its rows; None where the model family has no FLOPs model.
    batch_scoring_s: the batch's scoring and selection time.
    """

    batch_ttft_s: float
    latency_s: float
    wall_share_s: float
    output_tokens: int
    visual_in: int
    visual_kept: int
    visual_layer_avg: float
    llm_input_tokens: int
    prefill_flops: float | None
    scoring_flops: float | None
    batch_scoring_s: float

    def throughput_entry(self) -> dict[str, float]:
        """The additional_metrics for `gen_metrics.log_metrics` (numbers only; None values left out)."""
        entry = {
            "total_requests": 1,
            "batch_ttft_s": self.batch_ttft_s,
            "batch_scoring_s": self.batch_scoring_s,
            "wall_share_s": self.wall_share_s,
            "visual_tokens_in": self.visual_in,
            "visual_tokens_kept": self.visual_kept,
            "visual_tokens_layer_avg": self.visual_layer_avg,
            "llm_input_tokens": self.llm_input_tokens,
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
    """One `RowReport` per batch row of a prefill that just ran (with `pruner` active, or None):
    `ttft_s` / `elapsed_s` are the batch's time to first token and wall time."""
    stats = pruner.stats if pruner is not None else None
    rows = inputs["input_ids"].shape[0]
    visual_in = visual_counts(model, inputs)
    real = (
        inputs["attention_mask"].sum(1).tolist()
        if "attention_mask" in inputs
        else [inputs["input_ids"].shape[1]] * rows
    )
    total = prefill_flops(model, inputs, stats, pruner)
    return [
        RowReport(
            batch_ttft_s=ttft_s,
            latency_s=elapsed_s,
            wall_share_s=elapsed_s / rows,
            output_tokens=output_tokens[b],
            visual_in=stats.visual_in[b] if stats else visual_in[b],
            visual_kept=stats.visual_kept[b] if stats else visual_in[b],
            visual_layer_avg=stats.layer_averaged_visual(b) if stats else float(visual_in[b]),
            llm_input_tokens=stats.layer_tokens[b][0] if stats else int(real[b]),
            prefill_flops=None if total is None else total[0] / rows,
            scoring_flops=None if total is None else total[1] / rows,
            batch_scoring_s=stats.scoring_seconds if stats else 0.0,
        )
        for b in range(rows)
    ]
