"""The papers' standard settings, measured side by side with `tokprune bench`.

    python benchmarks/standard_settings.py llava-1.5-7b --layers 4          # CPU: a truncated LLM
    python benchmarks/standard_settings.py llava-next-7b --layers 4 --budgets 160   # one of the three
    python benchmarks/standard_settings.py qwen2.5-vl-7b --device cuda --dtype bfloat16 --attn flash_attention_2

Budgets (visual tokens per image): LLaVA-1.5 192/128/64 of 576; LLaVA-NeXT 640/320/160 of up to 2880;
Qwen2.5-VL 33.3/22.2/11.1 % (the same fractions as LLaVA-1.5's 192/128/64 of 576). Every registered method
runs at every budget next to the unpruned model, plus FastV and PyramidDrop scored the reference codes' way
(eager attention + output_attentions). Results go to benchmarks/results/<preset>-<device>-<date>/.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import tokprune
from tokprune import cli

BUDGETS = {
    "llava-1.5-7b": ["192", "128", "64"],
    "llava-next-7b": ["640", "320", "160"],
    "qwen2.5-vl-7b": ["33.3%", "22.2%", "11.1%"],
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("preset", choices=sorted(BUDGETS))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--repeats", default="3")
    parser.add_argument("--max-new-tokens", default="8")
    parser.add_argument("--methods", nargs="+", default=tokprune.available_methods())
    parser.add_argument(
        "--budgets", nargs="+", default=None, help="a subset of the preset's standard budgets"
    )
    parser.add_argument(
        "--results", type=Path, default=Path(__file__).parent / "results", help="parent folder"
    )
    args = parser.parse_args()
    budgets = args.budgets or BUDGETS[args.preset]
    if not set(budgets) <= set(BUDGETS[args.preset]):
        parser.error(f"--budgets: the standard budgets of {args.preset} are {' '.join(BUDGETS[args.preset])}")
    date = datetime.date.today().isoformat()
    depth = f"-{args.layers}layers" if args.layers else ""
    out = args.results / f"{args.preset}{depth}-{args.attn}-{args.device.split(':')[0]}-{date}"
    argv = ["bench", "--model", args.preset, "--methods", *args.methods, "--budgets", *budgets,
            "--eager-baseline", "--repeats", args.repeats, "--max-new-tokens", args.max_new_tokens,
            "--device", args.device, "--dtype", args.dtype, "--attn", args.attn, "--out", str(out)]  # fmt: skip
    if args.layers:
        argv += ["--layers", str(args.layers)]
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
