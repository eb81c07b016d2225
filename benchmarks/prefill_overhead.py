"""Prefill overhead of the pre-LLM pruning methods: realised pruned prefill vs. the ideal one.

On a LLaVA-1.5-shaped `LlavaForConditionalGeneration` with random weights (CLIP ViT-L/14 @ 336 px, 576
visual tokens; a Llama-7B-wide language model with `--layers` decoder layers), for every pre-LLM method
at `--budget` visual tokens, measured in the same run, interleaved, after a warm-up round:

  realised = model(**inputs) under `tokprune.apply(model, method, budget=...)`
  ideal    = vision tower (+ projector) on the image
             + language model on the pruned length L' = L - 576 + budget (random inputs_embeds)
             + lm_head on the last position
  ratio    = realised / ideal (target: within 10%, i.e. <= 1.10)
  scoring  = pruner.stats.scoring_seconds (ViT-side signals + selection), also as % of realised
  speed-up = unpruned prefill / realised

Medians over `--repeats` rounds. The script never fails on a MISS; it only reports it.

    python benchmarks/prefill_overhead.py                    # CPU, 2 LLM layers, fp32, sdpa
    python benchmarks/prefill_overhead.py --device cuda --layers 32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import platform
import statistics
import time

import torch
import transformers

import tokprune
from tokprune.bench.measure import cpu_model_name, load_average, synchronize
from tokprune.bench.presets import PRESETS
from tokprune.methods import LLMMethod, make_method

N_VISUAL = 576  # (336 / 14) ** 2 tokens per image of the llava-1.5-7b preset
TARGET = 1.10  # realised within 10% of ideal
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- timing
def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class Bench:
    """The measured callables of one configuration."""

    def __init__(self, model, inputs: dict, budget: int, device: torch.device, dtype: torch.dtype):
        self.model, self.inputs, self.budget, self.device = model, inputs, budget, device
        self.length = inputs["input_ids"].shape[1]
        self.pruned_length = self.length - N_VISUAL + budget
        accepts = inspect.signature(model.forward).parameters
        self.forward_kwargs = {"use_cache": True}
        if "logits_to_keep" in accepts:
            self.forward_kwargs["logits_to_keep"] = 1
        hidden = model.config.text_config.hidden_size
        generator = torch.Generator().manual_seed(1)
        self.pruned_embeds = torch.randn(1, self.pruned_length, hidden, generator=generator).to(
            device=device, dtype=dtype
        )
        self.pruned_mask = torch.ones(1, self.pruned_length, dtype=torch.long, device=device)

    def prefill(self) -> float:
        return timed(lambda: self.model(**self.inputs, **self.forward_kwargs), self.device)

    def pruned_prefill(self, method: str) -> tuple[float, tokprune.PruneStats]:
        with tokprune.apply(self.model, method, budget=self.budget) as pruner:
            seconds = self.prefill()
            stats = pruner.stats
        return seconds, stats

    def vision(self) -> float:
        pixel_values = self.inputs["pixel_values"]
        return timed(lambda: self.model.model.get_image_features(pixel_values=pixel_values), self.device)

    def language(self) -> float:
        def run():
            out = self.model.model.language_model(
                inputs_embeds=self.pruned_embeds, attention_mask=self.pruned_mask, use_cache=True
            )
            self.model.lm_head(out.last_hidden_state[:, -1:])

        return timed(run, self.device)


def pre_llm_methods() -> list[str]:
    return [m for m in tokprune.available_methods() if not isinstance(make_method(m, {}), LLMMethod)]


def measure(bench: Bench, methods: list[str], repeats: int) -> dict:
    """One warm-up round, then `repeats` rounds; inside a round the order rotates so no job is always first."""
    jobs = ["unpruned", "ideal", *methods]
    samples: dict[str, list] = {job: [] for job in jobs}
    samples.update(vision=[], language=[])
    checks: dict[str, tuple[list[int], int]] = {}
    for round_ in range(repeats + 1):
        shift = round_ % len(jobs)
        for job in jobs[shift:] + jobs[:shift]:
            if job == "unpruned":
                record = bench.prefill()
            elif job == "ideal":
                vision, language = bench.vision(), bench.language()
                record = vision + language
                if round_:
                    samples["vision"].append(vision)
                    samples["language"].append(language)
            else:
                seconds, stats = bench.pruned_prefill(job)
                record = (seconds, stats.scoring_seconds)
                checks[job] = (stats.visual_kept, stats.layer_lengths[0])
            if round_:  # round 0 is the warm-up
                samples[job].append(record)
        print(f"  round {round_}/{repeats}{' (warm-up)' if round_ == 0 else ''} done", flush=True)
    return {"samples": samples, "checks": checks}


# ---------------------------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    model = cpu_model_name()
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def report(args, bench: Bench, result: dict, build_seconds: float, wall: float) -> None:
    med = statistics.median
    samples, checks = result["samples"], result["checks"]
    unpruned = med(samples["unpruned"])
    ideal, ideal_min = med(samples["ideal"]), min(samples["ideal"])
    vision, language = med(samples["vision"]), med(samples["language"])
    ms = 1e3
    print()
    print("tokprune prefill overhead — pre-LLM methods, realised vs ideal pruned prefill")
    print(f"  date          {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"  device        {device_name(bench.device)}")
    print(
        f"  versions      torch {torch.__version__}, transformers {transformers.__version__}, "
        f"tokprune {tokprune.__version__}, python {platform.python_version()}"
    )
    print(
        f"  model         LLaVA-1.5 shape, random weights: CLIP ViT-L/14-336 (24 layers) + "
        f"Llama-7B-wide LM with {args.layers} layer(s)"
    )
    print(f"  dtype / attn  {args.dtype} / {args.attn}")
    print(
        f"  prompt        {bench.length} tokens ({N_VISUAL} visual); budget {args.budget} "
        f"-> LLM length {bench.pruned_length}"
    )
    print(f"  repeats       {args.repeats} (medians, after 1 warm-up round; jobs interleaved)")
    print(f"  unpruned      {unpruned * ms:9.1f} ms prefill")
    print(
        f"  ideal         {ideal * ms:9.1f} ms = vision tower + projector {vision * ms:.1f} + "
        f"LM on {bench.pruned_length} tokens + lm_head {language * ms:.1f}"
    )
    print(f"  target        realised / ideal <= {TARGET:.2f} (PASS/MISS on the ratio of medians)")
    print(
        f"  load average  {result['load'][0]} before, {result['load'][1]} after (1-min; > threads = contended)"
    )
    print()
    header = (
        f"{'method':<10} {'kept':>4} {'L_llm':>5} {'realised ms':>11} {'ideal ms':>9} {'real/ideal':>10} {'(min)':>6} "
        f"{'overhead ms':>11} {'scoring ms':>10} {'scoring %':>9} {'speed-up':>8}  {'target':<6}"
    )
    print(header)
    print("-" * len(header))
    rows = {}
    for method in result["methods"]:
        realised = med(s for s, _ in samples[method])
        ratio_min = min(s for s, _ in samples[method]) / ideal_min
        scoring = med(c for _, c in samples[method])
        ratio = realised / ideal
        kept, llm_length = checks[method]
        verdict = "PASS" if ratio <= TARGET else "MISS"
        note = ""
        if kept != [args.budget] or llm_length != bench.pruned_length:
            note = f"  (! expected {args.budget} kept / L {bench.pruned_length})"
        rows[method] = (realised, scoring)
        print(
            f"{method:<10} {','.join(map(str, kept)):>4} {llm_length:>5} {realised * ms:>11.1f} "
            f"{ideal * ms:>9.1f} {ratio:>10.3f} {ratio_min:>6.3f} {(realised - ideal) * ms:>11.1f} {scoring * ms:>10.2f} "
            f"{100 * scoring / realised:>8.2f}% {unpruned / realised:>7.2f}x  {verdict:<6}{note}"
        )
    print("-" * len(header))
    if "divprune" in rows:
        realised, scoring = rows["divprune"]
        print(
            f"DivPrune scoring time: {scoring * ms:.2f} ms ({100 * scoring / realised:.2f}% of its prefill)"
        )
    print("(min) = fastest realised / fastest ideal, less sensitive to other load on a shared machine;")
    print("overhead = realised - ideal; scoring % = scoring / realised; speed-up = unpruned / realised")
    print(f"model build {build_seconds:.1f} s, measurement {wall:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2, help="LLM decoder layers (32 = the real 7B)")
    parser.add_argument("--budget", type=int, default=64, help="visual tokens kept per image")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (medians)")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, ...)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not 0 < args.budget < N_VISUAL:
        parser.error(f"--budget must be in 1..{N_VISUAL - 1}")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    methods = pre_llm_methods()
    print(f"pre-LLM methods: {', '.join(methods)}", flush=True)

    start = time.perf_counter()
    model, make_inputs = PRESETS["llava-1.5-7b"].build(args.layers, args.attn, dtype, device)
    inputs = make_inputs(1)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == N_VISUAL
    build_seconds = time.perf_counter() - start
    print(f"built the model in {build_seconds:.1f} s", flush=True)

    bench = Bench(model, inputs, args.budget, device, dtype)
    start = time.perf_counter()
    load_before = load_average()
    with torch.no_grad():
        result = measure(bench, methods, args.repeats)
    result["methods"] = methods
    result["load"] = (load_before, load_average())
    report(args, bench, result, build_seconds, time.perf_counter() - start)


if __name__ == "__main__":
    main()
