"""The measuring harness: settings interleaved and repeated after warm-up, medians and spread.

For each setting (the unpruned baseline, or a method at a budget) and each repeat it measures the
prefill (time to first token), end-to-end generation of N new tokens (decode tokens/s follows), peak
memory, KV-cache bytes and tokprune's scoring time, and computes the analytic FLOPs and the budget
accounting (visual tokens entering the LLM and the layer-averaged count).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field

import torch

import tokprune
from tokprune.bench.measure import (
    PeakMemory,
    cache_lengths,
    kv_cache_bytes,
    return_freed_memory_to_os,
    stopwatch,
    synchronize,
)
from tokprune.core.compat import output_cache


@dataclass(frozen=True)
class Setting:
    """One configuration to measure. method None = the unpruned baseline.

    scoring: "inplace" (tokprune's own signals, the model keeps its attention backend) or "eager" (the
    reference codes' practice: the whole model, vision tower and LLM, switched to eager attention and run
    with output_attentions=True).
    """

    method: str | None = None
    budget: int | None = None
    keep_ratio: float | None = None
    options: tuple[tuple[str, object], ...] = ()
    scoring: str = "inplace"

    @property
    def label(self) -> str:
        if self.method is None:
            return "baseline"
        amount = f"{self.budget}" if self.budget is not None else f"{self.keep_ratio:.3g}"
        extra = "".join(f",{k}={v}" for k, v in self.options)
        eager = " [eager+output_attentions]" if self.scoring == "eager" else ""
        return f"{self.method}@{amount}{extra}{eager}"


@dataclass
class Measurement:
    """Per-repeat samples and the derived, repeat-independent facts of one setting."""

    setting: Setting
    samples: dict[str, list[float]] = field(default_factory=dict)
    facts: dict[str, object] = field(default_factory=dict)

    def add(self, record: dict) -> None:
        for key, value in record.items():
            self.samples.setdefault(key, []).append(float(value))

    def summary(self) -> dict:
        """Medians, min/max and the facts, flat, JSON-friendly."""
        out: dict[str, object] = {"setting": self.setting.label, "method": self.setting.method or "baseline"}
        out.update(
            budget=self.setting.budget, keep_ratio=self.setting.keep_ratio, scoring=self.setting.scoring
        )
        out.update(self.facts)
        for key, values in self.samples.items():
            out[f"{key}_median"] = statistics.median(values)
            out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
        return out


class ForwardClock:
    """Timestamps (perf_counter, CUDA synchronised) of the end of every forward of `model`."""

    def __init__(self, model, device) -> None:
        self.model, self.device, self.ends = model, device, []

    def __enter__(self) -> ForwardClock:
        self.handle = self.model.register_forward_hook(self._tick)
        return self

    def _tick(self, module, args, output) -> None:
        synchronize(self.device)
        self.ends.append(time.perf_counter())

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def attention_backends(model) -> dict[str, str]:
    """{sub-config name: attention implementation} of the model's vision and text sub-models."""
    config = model.config
    names = [n for n in ("vision_config", "text_config") if getattr(config, n, None) is not None]
    return {name: getattr(config, name)._attn_implementation for name in names}


@contextlib.contextmanager
def applied(model, setting: Setting):
    """The setting installed on the model (nothing for the baseline); yields the Pruner or None."""
    if setting.method is None:
        yield None
        return
    previous = attention_backends(model) if setting.scoring == "eager" else None
    if previous is not None:
        model.set_attn_implementation(dict.fromkeys(previous, "eager"))
    pruner = tokprune.apply(
        model, setting.method, budget=setting.budget, keep_ratio=setting.keep_ratio, **dict(setting.options)
    )
    try:
        yield pruner
    finally:
        pruner.remove()
        if previous is not None:
            model.set_attn_implementation(previous)


def _measure_once(model, inputs: dict, setting: Setting, max_new_tokens: int, device) -> tuple[dict, dict]:
    """One repeat of one setting: (timings/memory record, facts from this run)."""
    record: dict[str, float] = {}
    # the reference codes compute the prefill's attention maps; decoding then runs plain eager attention
    extra = {"output_attentions": True} if setting.scoring == "eager" else {}
    with applied(model, setting) as pruner, torch.no_grad():
        with PeakMemory(device) as memory, stopwatch(record, "prefill_s", device):
            out = model(**inputs, use_cache=True, logits_to_keep=1, **extra)
        record["peak_prefill_bytes"] = memory.peak_bytes
        record["kv_cache_bytes"] = kv_cache_bytes(output_cache(out))
        stats = pruner.stats if pruner is not None else None
        lengths = cache_lengths(output_cache(out))
        del out
        with (
            PeakMemory(device) as memory,
            ForwardClock(model, device) as clock,
            stopwatch(record, "e2e_s", device),
        ):
            model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        record["peak_e2e_bytes"] = memory.peak_bytes
    # decode speed inside the same generate() call: forward ends after the first (the prefill's) one;
    # with one new token there is no decode step, and no figure (the table shows "—", not 0)
    if len(clock.ends) > 1:
        record["decode_tokens_per_s"] = (len(clock.ends) - 1) / (clock.ends[-1] - clock.ends[0])
    record["scoring_s"] = stats.scoring_seconds if stats is not None else 0.0
    return record, {"stats": stats, "cache_lengths": lengths}


def _facts(model, inputs: dict, setting: Setting, stats, lengths: list[int]) -> dict:
    """Budget accounting and FLOPs of a setting (deterministic, computed once)."""
    from tokprune import flops
    from tokprune.patches import adapter_for

    visual = adapter_for(model).visual_mask(inputs["input_ids"])  # image (and video) placeholders
    visual_in = visual.sum(1).tolist()
    kept = stats.visual_kept if stats is not None else visual_in
    if stats is not None:
        averaged = [stats.layer_averaged_visual(row) for row in range(len(kept))]
        layer_tokens = stats.layer_tokens
    else:
        averaged = [float(v) for v in visual_in]
        layer_tokens = None
    signals = ()
    if setting.method is not None:
        signals = flops.scoring_signals(tokprune.methods.make_method(setting.method, dict(setting.options)))
    breakdown = flops.prefill_flops(model, inputs, stats, logits_to_keep=1, signals=signals)
    rows = visual.shape[0]
    decode = flops.decode_step_flops(model, [lengths] * rows) if lengths else 0.0
    return {
        "visual_tokens_in": sum(visual_in) / rows,
        "visual_tokens_into_llm": sum(_into_llm(stats, visual_in)) / rows,
        "visual_tokens_final": sum(kept) / rows,
        "visual_tokens_layer_averaged": sum(averaged) / rows,
        "layer_tokens": layer_tokens[0] if layer_tokens else None,
        "flops_prefill": breakdown.total,
        "flops_breakdown": breakdown.as_dict(),
        "flops_decode_step": decode,
    }


def _into_llm(stats, visual_in: list[int]) -> list[int]:
    """Visual tokens per row entering the LLM (after a pre-LLM stage, if any)."""
    if stats is not None and stats.stages and stats.stages[0].where == "pre":
        return stats.stages[0].visual_kept
    return visual_in


def run_benchmark(
    model,
    inputs: dict,
    settings: list[Setting],
    *,
    max_new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Measure every setting `repeats` times (after `warmup` discarded rounds), interleaved in rotating
    order so that drifting machine load spreads over all settings. Returns one summary dict per setting
    (in the order given) with ratios to the baseline when a baseline setting is included."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    if device.type == "cpu":
        return_freed_memory_to_os()
    results = {s: Measurement(s) for s in settings}
    rounds = warmup + repeats
    bar = tqdm(total=rounds * len(settings), disable=not progress, desc="bench", unit="run")
    for round_index in range(rounds):
        shift = round_index % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            bar.set_postfix_str(setting.label)
            record, info = _measure_once(model, inputs, setting, max_new_tokens, device)
            if round_index >= warmup:
                results[setting].add(record)
            if not results[setting].facts:
                results[setting].facts = _facts(model, inputs, setting, info["stats"], info["cache_lengths"])
            bar.update()
    bar.close()
    summaries = [results[s].summary() for s in settings]
    return add_ratios(summaries)


def add_ratios(summaries: list[dict]) -> list[dict]:
    """Speed-ups and FLOPs ratios against the baseline row, where there is one."""
    base = next((s for s in summaries if s["method"] == "baseline"), None)
    if base is None:
        return summaries
    for s in summaries:
        s["prefill_speedup"] = base["prefill_s_median"] / s["prefill_s_median"]
        s["e2e_speedup"] = base["e2e_s_median"] / s["e2e_s_median"]
        s["flops_prefill_ratio"] = s["flops_prefill"] / base["flops_prefill"]
        s["flops_predicted_speedup"] = base["flops_prefill"] / s["flops_prefill"]
        s["realised_over_predicted"] = s["prefill_speedup"] / s["flops_predicted_speedup"]
        s["scoring_share_of_prefill"] = s["scoring_s_median"] / s["prefill_s_median"]
    return summaries
