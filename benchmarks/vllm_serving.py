"""vLLM with and without tokprune's plugin, on the same machine and the same requests: time to first token,
throughput and KV-cache blocks, side by side in one run.

Runs in the plugin's environment (`make vllm-env`); every setting gets a fresh in-process engine on the
same model folder, stock first, then one per method:

    .venv-vllm/bin/python benchmarks/vllm_serving.py                                  # shipped toy LLaVA, ~2 min
    .venv-vllm/bin/python benchmarks/vllm_serving.py --model llava-1.5-7b --layers 4  # 7B shapes, 4 LLM layers
    .venv-vllm/bin/python benchmarks/vllm_serving.py --model llava-1.5-7b --layers 32 --dtype bfloat16  # GPU

Measured per setting (the same requests, images of different sizes, each prompt with one image):
* TTFT: wall time of `LLM.generate([request], max_tokens=1)` for one request alone (the image processor,
  the vision tower with the method's selection, the prefill and one sampled token), the median over
  `--repeats` rounds of every request, after one warm-up request;
* throughput: every request submitted at once, `--max-tokens` tokens each (`ignore_eos`), output tokens and
  requests per second of wall time, the median over `--repeats` batches after one warm-up batch;
* KV blocks: what the batch holds at its end, sum over requests of ceil((prompt + generated tokens) /
  block_size), from the token counts vLLM reports (prefix caching off, so no block is shared).
Prefix caching and the multimodal processor cache are off, so a repeated request is computed again.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

CPU_ENV = dict(VLLM_HOST_IP="127.0.0.1", VLLM_LOOPBACK_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="4")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process, shut down in turn

TOY_PROMPT = "USER: <image> how many shapes ? ASSISTANT:"
SIZES = ((336, 336), (480, 640), (640, 360), (512, 512), (300, 420), (720, 540), (400, 400), (600, 800))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("toy", "llava-1.5-7b"), default="toy")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers of the llava-1.5-7b shape")
    parser.add_argument("--methods", nargs="+", default=["visionzip", "divprune", "fastervlm"])
    parser.add_argument("--budget", type=int, default=None, help="tokens kept per image (default: a ninth)")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (markdown)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = _cuda()
    if not gpu:
        for key, value in CPU_ENV.items():
            os.environ.setdefault(key, value)
    with tempfile.TemporaryDirectory(prefix="tokprune-vllm-bench-") as scratch:
        folder, prompt, n_visual, described = model_folder(args, Path(scratch))
        budget = args.budget or max(1, n_visual // 9)
        requests = make_requests(prompt, args.requests)
        settings = [("vLLM (stock)", None)] + [(m, m) for m in args.methods]
        rows = [measure(folder, label, method, budget, requests, args, gpu) for label, method in settings]
    report = render(rows, args, described, n_visual, budget, gpu)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def model_folder(args, scratch: Path) -> tuple[Path, str, int, str]:
    """(folder in the hub layout vLLM loads, the prompt with one <image>, visual tokens per image, a line
    describing the model)."""
    from tokprune.serving.vllm.checkpoints import copy_in_hub_layout

    if args.model == "toy":
        from tokprune.toy.model import WEIGHTS

        folder = copy_in_hub_layout(WEIGHTS, scratch / "toy")
        return folder, TOY_PROMPT, 196, "shipped toy LLaVA (trained; CLIP tower at 112 px, 196 visual tokens)"
    return _llava15_folder(args, scratch)


def _llava15_folder(args, scratch: Path) -> tuple[Path, str, int, str]:
    """The llava-1.5-7b preset (random weights, CLIP ViT-L/14-336 + a Vicuna-7B-wide LM of --layers layers)
    saved once in float32; vLLM casts it to --dtype."""
    import torch

    from tokprune.bench.presets import LLAVA15_PROMPT, build_llava15, llava15_processor
    from tokprune.serving.vllm.checkpoints import copy_in_hub_layout

    model, _ = build_llava15(args.layers, "sdpa", torch.float32, torch.device("cpu"))
    source = scratch / "saved"
    model.save_pretrained(source)
    llava15_processor().save_pretrained(source)
    del model
    gc.collect()
    folder = copy_in_hub_layout(source, scratch / "hub")
    for path in source.glob("*"):
        path.unlink()
    described = (
        f"llava-1.5-7b shape, random weights: CLIP ViT-L/14-336 (24 layers, 576 visual tokens) + "
        f"Vicuna-7B-wide LM with {args.layers} layer(s)"
    )
    return folder, LLAVA15_PROMPT, 576, described


def make_requests(prompt: str, count: int) -> list[dict]:
    """`count` one-image requests, images of different sizes and contents (the processor resizes them)."""
    from tokprune.bench.synthetic import rand_image

    return [
        {"prompt": prompt, "multi_modal_data": {"image": rand_image(*SIZES[i % len(SIZES)], seed=i)}}
        for i in range(count)
    ]


def engine_kwargs(args, gpu: bool) -> dict:
    return dict(
        dtype=args.dtype, limit_mm_per_prompt={"image": 1}, seed=0,
        enforce_eager=not gpu, enable_prefix_caching=False, mm_processor_cache_gb=0,
    )  # fmt: skip


def measure(folder: Path, label: str, method: str | None, budget: int, requests, args, gpu: bool) -> dict:
    """One setting's numbers, on a fresh engine that is shut down afterwards."""
    from vllm import LLM

    from tokprune.serving.vllm import overrides

    extra = {"hf_overrides": overrides(folder, method, budget=budget)} if method else {}
    start = time.perf_counter()
    llm = LLM(model=str(folder), **engine_kwargs(args, gpu), **extra)
    startup = time.perf_counter() - start
    try:
        ttft = time_to_first_token(llm, requests, args.repeats)
        wall, outputs = batch_wall_time(llm, requests, args.max_tokens, args.repeats)
        block = llm.llm_engine.vllm_config.cache_config.block_size
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    prompt_tokens = [len(o.prompt_token_ids) for o in outputs]
    generated = [len(o.outputs[0].token_ids) for o in outputs]
    return dict(
        label=label, startup=startup, ttft=statistics.median(ttft), ttft_min=min(ttft),
        prompt_tokens=sum(prompt_tokens), generated=sum(generated), wall=wall,
        tokens_per_s=sum(generated) / wall, requests_per_s=len(outputs) / wall, block_size=block,
        kv_blocks=sum(math.ceil((p + g) / block) for p, g in zip(prompt_tokens, generated, strict=True)),
    )  # fmt: skip


def time_to_first_token(llm, requests: list[dict], repeats: int) -> list[float]:
    """Seconds of `generate([request], max_tokens=1)` for each request alone, `repeats` rounds, after one
    warm-up request."""
    from vllm import SamplingParams

    first = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate(requests[:1], first, use_tqdm=False)
    seconds = []
    for _ in range(repeats):
        for request in requests:
            start = time.perf_counter()
            llm.generate([request], first, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
    return seconds


def batch_wall_time(llm, requests: list[dict], max_tokens: int, repeats: int) -> tuple[float, list]:
    """(median seconds of all requests at once, `max_tokens` each, over `repeats` batches after a warm-up
    batch; the last batch's RequestOutputs)."""
    from vllm import SamplingParams

    many = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    llm.generate(requests, many, use_tqdm=False)
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.generate(requests, many, use_tqdm=False)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), outputs


def machine(gpu: bool) -> str:
    import torch

    if gpu:
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    from tokprune.bench.measure import cpu_model_name

    cpu = cpu_model_name()
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads), no GPU"


def render(rows: list[dict], args, described: str, n_visual: int, budget: int, gpu: bool) -> str:
    import torch
    import vllm

    import tokprune

    stock = rows[0]
    from tokprune.bench.measure import load_average

    lines = [
        f"$ python benchmarks/vllm_serving.py {' '.join(sys.argv[1:])}".rstrip(),
        "tokprune vLLM serving — the plugin vs stock vLLM, same engine settings and requests",
        f"  date        {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"  device      {machine(gpu)}",
        f"  versions    vllm {vllm.__version__}, torch {torch.__version__}, tokprune {tokprune.__version__}",
        f"  model       {described}",
        f"  dtype       {args.dtype}; enforce_eager={not gpu}; prefix caching and mm processor cache off",
        f"  requests    {args.requests} one-image prompts, images of {args.requests} sizes; "
        f"{n_visual} visual tokens per image unpruned, {budget} kept",
        f"  TTFT        one request alone, max_tokens=1, median of {args.repeats} x {args.requests} after a warm-up",
        f"  throughput  all {args.requests} at once, {args.max_tokens} output tokens each (ignore_eos), "
        f"median of {args.repeats} batches after a warm-up",
        f"  KV blocks   sum of ceil((prompt + generated) / {stock['block_size']}) at the batch's end",
        f"  load avg    {load_average()} (1-min, at the end)",
        "",
        "| setting | prompt tokens | TTFT s (min) | TTFT vs stock | out tok/s | req/s | throughput vs stock "
        "| KV blocks | KV vs stock | engine start s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['prompt_tokens']} | {row['ttft']:.3f} ({row['ttft_min']:.3f}) "
            f"| {row['ttft'] / stock['ttft']:.2f} | {row['tokens_per_s']:.1f} | {row['requests_per_s']:.2f} "
            f"| {row['tokens_per_s'] / stock['tokens_per_s']:.2f} | {row['kv_blocks']} "
            f"| {row['kv_blocks'] / stock['kv_blocks']:.2f} | {row['startup']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
