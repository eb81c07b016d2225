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
import contextlib
import datetime
import importlib
import inspect
import os
import platform
import statistics
import time

import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import tokprune
from tokprune.methods import LLMMethod, make_method

N_VISUAL = 576  # (336 / 14) ** 2
IMAGE_TOKEN_ID = 32000
BOS_ID = 1
TEXT_BEFORE = 5  # "USER: " and friends
TEXT_AFTER = 40  # the question and "ASSISTANT:"
TARGET = 1.10  # realised within 10% of ideal
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- model
def _no_init_weights():
    """transformers' context manager that skips weight initialisation (its home moved across versions)."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(module).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def build_model(layers: int, attn: str, dtype: torch.dtype, device: torch.device, std: float = 0.02):
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
        bos_token_id=BOS_ID,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=N_VISUAL,
    )
    config._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _no_init_weights(), device:
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    # Small random normal weights (so attention softmaxes are neither one-hot nor uniform); norms at 1.
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif param.dim() == 1 and name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point() and not torch.isfinite(buffer).all():
                raise RuntimeError(f"buffer {name} was left uninitialised")
    return model.eval()


def build_inputs(device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(3, IMAGE_TOKEN_ID, (TEXT_BEFORE,), generator=generator)
    after = torch.randint(3, IMAGE_TOKEN_ID, (TEXT_AFTER,), generator=generator)
    image = torch.full((N_VISUAL,), IMAGE_TOKEN_ID)
    input_ids = torch.cat([torch.tensor([BOS_ID]), before, image, after])[None]
    pixel_values = torch.randn(1, 3, 336, 336, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device=device, dtype=dtype),
    }


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
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
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


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
    model = build_model(args.layers, args.attn, dtype, device)
    inputs = build_inputs(device, dtype)
    build_seconds = time.perf_counter() - start
    print(f"built the model in {build_seconds:.1f} s", flush=True)

    bench = Bench(model, inputs, args.budget, device, dtype)
    start = time.perf_counter()
    load_before = _load()
    with torch.no_grad():
        result = measure(bench, methods, args.repeats)
    result["methods"] = methods
    result["load"] = (load_before, _load())
    report(args, bench, result, build_seconds, time.perf_counter() - start)


if __name__ == "__main__":
    main()
