"""The `tokprune` command: `demo`, `bench`, `robustness`, `methods`, `models`."""

from __future__ import annotations

import argparse
import os
import sys

from tokprune.cli.arguments import ATTENTION, DTYPES, CliError, parse_budget, parse_option, split_list
from tokprune.cli.commands import _runnable, print_methods, print_models, run_bench, run_demo, run_robustness
from tokprune.errors import TokpruneError

__all__ = ["CliError", "build_parser", "main", "parse_budget", "parse_option", "split_list", "_runnable"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="accuracy against kept tokens of every method on held-out toy VQA questions (offline, CPU)",
    )
    demo.add_argument(
        "--model",
        default="toy",
        help="'toy' (the trained toy VLM shipped in the package), a local path or an HF id",
    )
    demo.add_argument("--methods", nargs="*", default=[], help="default: every registered method")
    demo.add_argument("--budgets", nargs="*", default=[], help="default: keep ratios 0.5 0.25 0.125")
    demo.add_argument("--questions", type=int, default=200, help="held-out questions (default 200)")
    demo.add_argument("--batch-size", type=int, default=50)
    demo.add_argument("--attn", default="sdpa", choices=ATTENTION)
    demo.add_argument("--dtype", default="float32", choices=DTYPES)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--out", default="demo-results", help="folder for the table, plot and picture")
    bench = sub.add_parser(
        "bench", help="measure prefill/decode time, memory and FLOPs of methods vs unpruned"
    )
    bench.add_argument(
        "--model", required=True, help="a preset (see `tokprune models`), a local path or an HF id"
    )
    bench.add_argument(
        "--methods", nargs="+", default=[], help="registered method names (comma or space separated)"
    )
    bench.add_argument(
        "--budgets", nargs="+", default=[], help="tokens per image (64), keep ratios (0.25) or 33.3%%"
    )
    bench.add_argument("--option", action="append", default=[], help="method option name=value (repeatable)")
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--max-new-tokens", type=int, default=16)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--attn", choices=ATTENTION, default="sdpa")
    bench.add_argument("--dtype", choices=DTYPES, default="float32")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--layers", type=int, default=None, help="truncate the LLM of a preset to N layers")
    bench.add_argument(
        "--eager-baseline",
        action="store_true",
        help="also run in-LLM attention methods the reference-code way (eager attention + output_attentions)",
    )
    bench.add_argument("--out", default="bench-results", help="output folder")
    bench.add_argument("--no-progress", action="store_true")
    robust = sub.add_parser("robustness", help="how stable each method's kept set is under input noise")
    robust.add_argument(
        "--model", required=True, help="a preset, 'toy' (the shipped trained VLM), a local path or an HF id"
    )
    robust.add_argument("--methods", nargs="+", default=[], help="methods (default: every registered one)")
    robust.add_argument("--budget", default="64", help="tokens per image (64), keep ratio (0.25) or 33.3%%")
    robust.add_argument("--noise-std", type=float, default=0.01, help="Gaussian noise in normalised pixels")
    robust.add_argument("--trials", type=int, default=5, help="noisy copies per method (>= 1)")
    robust.add_argument("--option", action="append", default=[], help="method option name=value (repeatable)")
    robust.add_argument("--layers", type=int, default=None)
    robust.add_argument("--attn", choices=ATTENTION, default="sdpa")
    robust.add_argument("--dtype", choices=DTYPES, default="float32")
    robust.add_argument("--device", default="cpu")
    sub.add_parser("methods", help="list the registered methods")
    sub.add_parser("models", help="list supported model classes with their families, and benchmark presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(args)
        if args.command == "bench":
            return run_bench(args)
        if args.command == "robustness":
            return run_robustness(args)
        if args.command == "methods":
            return print_methods()
        return print_models()
    except (CliError, TokpruneError) as error:
        print(f"tokprune: error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:  # e.g. the toy weights are missing
        print(f"tokprune: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tokprune methods | head`: the reader left; stop quietly, as coreutils do
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
