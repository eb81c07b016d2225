"""The `tokprune` command: `demo`, `bench`, `robustness`, `methods`, `models`."""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import tokprune
from tokprune.errors import TokpruneError

DTYPES = ("float32", "bfloat16", "float16")
# transformers' attention backends tokprune is tested with (flex_attention: on families whose
# transformers classes support it; its kernels are compiled, which needs a GPU or a working inductor)
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flex_attention")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def parse_budget(text: str) -> dict:
    """'64' -> budget=64; '0.25' -> keep_ratio=0.25; '33.3%' -> keep_ratio=0.333."""
    try:
        if text.endswith("%"):
            return {"keep_ratio": float(text[:-1]) / 100}
        if "." in text:
            return {"keep_ratio": float(text)}
        return {"budget": int(text)}
    except ValueError:
        raise CliError(
            f"budget {text!r} is not a token count (64), a keep ratio (0.25) or a percentage (33.3%)"
        ) from None


def parse_option(text: str) -> tuple[str, object]:
    """'layer=3' -> ('layer', 3); values are Python literals where they parse, else strings."""
    import ast

    if "=" not in text:
        raise CliError(f"option {text!r} must look like name=value (e.g. layer=3)")
    name, value = text.split("=", 1)
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def split_list(values: list[str]) -> list[str]:
    return [item for value in values for item in value.split(",") if item]


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
    robust.add_argument("--trials", type=int, default=5)
    robust.add_argument("--layers", type=int, default=None)
    robust.add_argument("--attn", choices=ATTENTION, default="sdpa")
    robust.add_argument("--dtype", choices=DTYPES, default="float32")
    robust.add_argument("--device", default="cpu")
    sub.add_parser("methods", help="list the registered methods")
    sub.add_parser("models", help="list supported model classes and benchmark presets")
    return parser


@contextmanager
def attention_backend(attn: str):
    """Around building a model: transformers' refusal of the --attn backend (flash-attn not installed, an
    architecture without flex_attention) becomes a one-line CliError."""
    try:
        yield
    except (ImportError, ValueError) as error:
        text = str(error)
        if "ttention" not in text:
            raise
        raise CliError(f"--attn {attn} cannot be used here: {text.splitlines()[0]}") from None


def load_model(name: str, layers: int | None, attn: str, dtype: str, device: str):
    """(model, make_inputs(batch_size)) from a preset, a local folder or an HF id."""
    with attention_backend(attn):
        return _load_model(name, layers, attn, dtype, device)


def _load_model(name: str, layers: int | None, attn: str, dtype: str, device: str):
    import torch

    from tokprune.bench.presets import PRESETS

    torch_dtype = getattr(torch, dtype)
    if name in PRESETS:
        return PRESETS[name].build(layers, attn, torch_dtype, torch.device(device))
    if layers is not None:
        raise CliError("--layers applies to presets only")
    if name == "toy":
        from tokprune.toy.model import toy_with_inputs

        return toy_with_inputs(attn, torch_dtype, device)
    if not Path(name).exists() and name.count("/") != 1:
        raise CliError(
            f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}), 'toy', a local folder or an HF id"
        )
    from tokprune.bench.synthetic import rand_image
    from tokprune.eval.loading import load_pretrained

    try:
        model, processor = load_pretrained(name, dtype, attn)
    except OSError as error:
        raise CliError(f"cannot load {name!r} (weights must be on this machine): {error}") from None
    model = model.to(device).eval()

    def make_inputs(batch_size: int = 1) -> dict:
        token = getattr(processor, "image_token", "<image>")
        texts = [f"USER: {token}\nDescribe the image in detail. ASSISTANT:"] * batch_size
        images = [rand_image(672, 672, seed=i) for i in range(batch_size)]
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        return {
            k: v.to(device=device, dtype=torch_dtype) if v.is_floating_point() else v.to(device)
            for k, v in batch.items()
        }

    return model, make_inputs


def settings_from(args) -> list:
    from tokprune.bench.harness import Setting
    from tokprune.methods import LLMMethod, make_method

    methods = split_list(args.methods)
    budgets = [parse_budget(b) for b in split_list(args.budgets)]
    options = tuple(parse_option(o) for o in args.option)
    if methods and not budgets:
        raise CliError("give --budgets with --methods (e.g. --budgets 192 128 64, or 0.25)")
    settings = [Setting()]
    for method in methods:
        instance = make_method(
            method, dict(options)
        )  # unknown names/options fail here, before any model loads
        for budget in budgets:
            settings.append(Setting(method=method, options=options, **budget))
            eager_scored = isinstance(instance, LLMMethod) and "last_query_attention" in instance.signals
            if args.eager_baseline and eager_scored:
                settings.append(Setting(method=method, options=options, scoring="eager", **budget))
    return settings


def run_bench(args) -> int:
    import torch
    import transformers

    from tokprune.bench.harness import run_benchmark
    from tokprune.bench.report import markdown_table, target_checks, write_results

    settings = settings_from(args)
    for name, value in (("--repeats", args.repeats), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CliError(f"{name} must be >= 1")
    model, make_inputs = load_model(args.model, args.layers, args.attn, args.dtype, args.device)
    for setting in settings[1:]:  # every setting installs once before any measuring: bad layers fail now
        tokprune.apply(
            model,
            setting.method,
            budget=setting.budget,
            keep_ratio=setting.keep_ratio,
            **dict(setting.options),
        ).remove()
    inputs = make_inputs(args.batch_size)
    rows = run_benchmark(
        model,
        inputs,
        settings,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        progress=not args.no_progress,
    )
    meta = {
        "model": args.model,
        "layers": args.layers,
        "attn": args.attn,
        "dtype": args.dtype,
        "device": _device_name(args.device),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokprune": tokprune.__version__,
        "flops_convention": "multiply-add = 2 FLOPs (as torch.utils.flop_counter)",
        "budget_accounting": "vis→LLM = visual tokens entering the LLM; vis avg/layer = sum (L_{i+1}-L_i) T_i / L",
    }
    paths = write_results(rows, meta, args.out)
    print(markdown_table(rows))
    print("\ntargets (reported, not enforced):")
    for line in target_checks(rows):
        print(f"  {line}")
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


def run_demo(args) -> int:
    import torch

    from tokprune.methods import make_method
    from tokprune.toy import demo
    from tokprune.toy.task import generate
    from tokprune.toy.train import HELD_OUT_SEED

    methods = split_list(args.methods)
    for method in methods:
        make_method(method, demo.TOY_OPTIONS.get(method, {}) if args.model == "toy" else {})
    budgets = [parse_budget(b) for b in split_list(args.budgets)] or [
        {"keep_ratio": r} for r in demo.KEEP_RATIOS
    ]
    for name, value in (("--questions", args.questions), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CliError(f"{name} must be >= 1")
    answerer = _demo_answerer(args)
    if not methods:  # every registered method this model can run (AnyRes-only ones need tiles)
        methods = _runnable(tokprune.available_methods(), answerer.model)
        skipped = sorted(set(tokprune.available_methods()) - set(methods))
        if skipped:
            print(f"skipped (need AnyRes tiles, which this model has not): {', '.join(skipped)}")
    samples = generate(args.questions, HELD_OUT_SEED)
    settings = [(None, {})] + [(m, b) for m in methods for b in budgets]
    print(
        f"{len(settings)} settings x {len(samples)} held-out questions on {args.model} ({args.device})",
        flush=True,
    )

    def progress(row):
        print(f"  {row.method:<14} {row.budget:<12} accuracy {100 * row.accuracy:5.1f}%", flush=True)

    start = time.perf_counter()
    rows = demo.run_settings(answerer, samples, settings, args.batch_size, progress)
    meta = {
        "model": args.model,
        "questions": len(samples),
        "device": _device_name(args.device),
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print("\n" + demo.table(rows))
    paths = demo.write_report(rows, samples, meta, Path(args.out))
    print(f"\n{meta['seconds']} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _demo_answerer(args):
    from tokprune.toy import demo

    if args.model == "toy":
        from tokprune.toy.model import load_toy

        with attention_backend(args.attn):
            model, processor = load_toy(attn=args.attn)
        return demo.ToyAnswerer(model.to(args.device), processor)
    from tokprune.eval.loading import load_pretrained, prepare

    with attention_backend(args.attn):
        model, processor = load_pretrained(args.model, args.dtype, args.attn)
    import torch

    return demo.ChatAnswerer(prepare(model, processor, torch.device(args.device)), processor)


def run_robustness(args) -> int:
    from tokprune.robustness import kept_set_stability

    budget = parse_budget(args.budget)
    methods = split_list(args.methods) or tokprune.available_methods()
    model, make_inputs = load_model(args.model, args.layers, args.attn, args.dtype, args.device)
    if not split_list(args.methods):
        methods = _runnable(methods, model)
    inputs = make_inputs(1)
    print(
        f"kept-set stability: mean Jaccard over {args.trials} noisy copies (std {args.noise_std}), {args.budget}"
    )
    from tokprune.toy.demo import TOY_OPTIONS

    for method in methods:
        options = TOY_OPTIONS.get(method, {}) if args.model == "toy" else {}  # the toy's 4-layer ViT
        result = kept_set_stability(
            model, inputs, method, noise_std=args.noise_std, trials=args.trials, **budget, **options
        )
        print(f"  {method:<13} mean {result['mean_jaccard']:.3f}  min {result['min_jaccard']:.3f}")
    return 0


def _runnable(methods: list[str], model) -> list[str]:
    """`methods` without those the model refuses: AnyRes-only methods (`needs_tiles`) on models whose
    images have no tiles. For the default "every method" lists; named methods fail with the reason."""
    from tokprune.methods import REGISTRY
    from tokprune.patches import adapter_for

    tiles = adapter_for(model).tiles
    return [m for m in methods if tiles or not REGISTRY[m].needs_tiles]


def print_methods() -> int:
    from tokprune.methods import REGISTRY

    for name in tokprune.available_methods():
        cls = REGISTRY[name]
        print(f"{name:<11} {cls.where:<4} default {cls.default_budget}  {cls.paper}")
    return 0


def print_models() -> int:
    from tokprune.bench.presets import PRESETS

    print("supported model classes:")
    for name in tokprune.available_models():
        print(f"  {name}")
    print("benchmark presets (random weights, real shapes):")
    for preset in PRESETS.values():
        print(f"  {preset.name:<15} {preset.description}")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
