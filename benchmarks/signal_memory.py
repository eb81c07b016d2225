"""Peak memory and time of computing each attention signal for N visual tokens: fused/chunked vs eager maps.

The eager approach is what the reference codes do: materialise softmax(Q Kᵀ) (H x N x N, as
`output_attentions` returns it) and reduce it. tokprune never forms the map: the chunked PyTorch path
streams over query chunks (tokprune.signals.attention), the Triton kernels (CUDA only) stream over tiles.

Signals and layouts (ViT-L heads: 16 x 64; LLM rows: Llama-7B with GQA, 32 query / 8 KV heads x 128):
  received/image  attention received per token, one block of N tokens (one high-resolution image)
  received/video  the same over frames of --frame tokens (block-diagonal, as the Qwen ViT runs a video)
  cls             the [CLS] row of one query over N keys
  last_query      FastV's score row: the last query of an LLM layer over N keys

    python benchmarks/signal_memory.py                              # CPU: N = 1k .. 32k (image layout to 8k)
    python benchmarks/signal_memory.py --device cuda --dtype bfloat16 --image-max-n 32768

Every (signal, N, approach) is timed as the median of --repeats runs after one warm-up; peak memory is
CUDA peak allocated, or on CPU the process RSS sampled every ms, above what the inputs use. The eager
approach is skipped where its map would exceed --eager-max-gb. The last column is peak(N) / peak(N/2):
about 2 means memory linear in N, about 4 quadratic.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokprune.bench.measure import PeakMemory, return_freed_memory_to_os, synchronize
from tokprune.kernels import triton_available
from tokprune.signals import attention

SIZES = [1024, 2048, 4096, 8192, 16384, 32768]


def eager_received(q: torch.Tensor, k: torch.Tensor, scale: float, sizes: list[int]) -> torch.Tensor:
    """(H, N, d) -> (N,): the full map of every block, column-averaged (what output_attentions gives)."""
    out, start = [], 0
    for n in sizes:
        probs = (
            (q[:, start : start + n].float() @ k[:, start : start + n].float().transpose(-1, -2)) * scale
        ).softmax(-1)
        out.append(probs.mean(dim=(0, 1)))
        start += n
    return torch.cat(out)


def eager_rows(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(1, H, N, d) queries of every token -> the map (1, H, N, N), then the last row (FastV's reference)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).float()
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
    probs = ((q.float() @ k.transpose(-1, -2)) * scale).masked_fill(~causal, float("-inf")).softmax(-1)
    return probs[:, :, -1].mean(1)


def cases(signal: str, n: int, frame: int, dtype, device):
    """(inputs description, {approach: callable}, eager map bytes) for one signal at N tokens."""
    g = torch.Generator(device="cpu").manual_seed(n)
    randn = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    if signal.startswith("received"):
        q, k = randn(16, n, 64), randn(16, n, 64)
        sizes = (
            [n] if signal == "received/image" else [frame] * (n // frame) + ([n % frame] if n % frame else [])
        )
        map_bytes = 2 * 4 * 16 * sum(s * s for s in sizes)
        return {
            "eager": lambda: eager_received(q, k, 0.125, sizes),
            "chunked": lambda: attention.received_attention(q, k, 0.125, sizes, backend="torch"),
            "triton": lambda: attention.received_attention(q, k, 0.125, sizes, backend="triton"),
        }, map_bytes
    if signal == "cls":
        q, k = randn(1, 16, 1, 64), randn(1, 16, n, 64)
        full_q = randn(1, 16, n, 64)
        return {
            "eager": lambda: (
                ((full_q.float() @ k.float().transpose(-1, -2)) * 0.125).softmax(-1)[:, :, 0].mean(1)
            ),
            "chunked": lambda: attention.cls_attention(q, k, 0.125, backend="torch"),
            "triton": lambda: attention.cls_attention(q, k, 0.125, backend="triton"),
        }, 2 * 4 * 16 * n * n
    q, k = randn(1, 32, 1, 128), randn(1, 8, n, 128)
    full_q = randn(1, 32, n, 128)
    return {
        "eager": lambda: eager_rows(full_q, k, 128**-0.5),
        "chunked": lambda: attention.last_query_attention(q, k, 128**-0.5, backend="torch"),
        "triton": lambda: attention.last_query_attention(q, k, 128**-0.5, backend="triton"),
    }, 2 * 4 * 32 * n * n


def measure(fn, device: torch.device, repeats: int) -> tuple[float, int]:
    """(median seconds, peak bytes above the inputs) of fn()."""
    with PeakMemory(device) as peak:
        fn()
        synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--image-max-n", type=int, default=8192, help="largest N of the one-block layout")
    parser.add_argument("--frame", type=int, default=1024, help="tokens per frame of the video layout")
    parser.add_argument("--eager-max-gb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(torch.get_num_threads())
        return_freed_memory_to_os()
    approaches = ["eager", "chunked"] + (["triton"] if device.type == "cuda" and triton_available() else [])
    print(f"# device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"dtype {args.dtype}, torch {torch.__version__}, approaches: {', '.join(approaches)}")  # fmt: skip
    print("| signal | N | approach | time ms | peak MB | peak(N)/peak(N/2) |")
    print("|---|---|---|---|---|---|")
    for signal in ("received/image", "received/video", "cls", "last_query"):
        previous: dict[str, int] = {}
        for n in args.sizes:
            if signal == "received/image" and n > args.image_max_n:
                continue
            fns, map_bytes = cases(signal, n, args.frame, dtype, device)
            for approach in approaches:
                if approach == "eager" and map_bytes > args.eager_max_gb * 2**30:
                    print(f"| {signal} | {n} | eager | skipped | map {map_bytes / 2**30:.1f} GB | |")
                    previous.pop(approach, None)
                    continue
                seconds, peak = measure(fns[approach], device, args.repeats)
                growth = f"{peak / previous[approach]:.2f}" if previous.get(approach) else ""
                previous[approach] = max(peak, 1)
                print(
                    f"| {signal} | {n} | {approach} | {seconds * 1e3:.1f} | {peak / 2**20:.1f} | {growth} |",
                    flush=True,
                )
            del fns


if __name__ == "__main__":
    main()
