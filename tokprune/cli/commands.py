"""The commands: `bench`, `demo`, `robustness`, `methods`, `models`."""

from __future__ import annotations

import datetime
import platform
import time

import tokprune
from tokprune.cli.arguments import CliError, check_device, check_out_dir, parse_budget, split_list
from tokprune.cli.extras import install_hint, is_missing
from tokprune.cli.loading import load_checkpoint, load_model
from tokprune.cli.options import check_on_preset, make_methods, method_options


def settings_from(args) -> tuple[list, dict]:
    """([the unpruned baseline, then every --methods x --budgets (and its eager-scored twin with
    --eager-baseline)], {name: Method}), each method with its --option values; bad names and options
    fail here."""
    from tokprune.bench.harness import Setting
    from tokprune.methods import LLMMethod

    names = split_list(args.methods)
    budgets = [parse_budget(b) for b in split_list(args.budgets)]
    if names and not budgets:
        raise CliError("give --budgets with --methods (e.g. --budgets 192 128 64, or 0.25)")
    if args.option and not names:
        raise CliError("--option sets method options: give --methods (and --budgets) with it")
    options = method_options(names, args.option)
    methods = make_methods(options)  # unknown names/options fail here, before any model loads
    settings = [Setting()]
    for name, method in methods.items():
        given = tuple(options[name].items())
        eager_scored = isinstance(method, LLMMethod) and "last_query_attention" in method.signals
        for budget in budgets:
            settings.append(Setting(method=name, options=given, **budget))
            if args.eager_baseline and eager_scored:
                settings.append(Setting(method=name, options=given, scoring="eager", **budget))
    return settings, methods


def run_bench(args) -> int:
    """`tokprune bench`: every check that needs no model first (options, --out, a preset's layers), then
    the model, every setting installed once, and the interleaved measurements."""
    import torch
    import transformers

    from tokprune.bench.harness import run_benchmark
    from tokprune.bench.presets import PRESETS
    from tokprune.bench.report import markdown_table, target_checks, write_results

    out = check_out_dir(args.out)
    settings, methods = settings_from(args)
    for name, value in (("--repeats", args.repeats), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CliError(f"{name} must be >= 1")
    if args.model in PRESETS:  # before its weights are built
        check_on_preset(methods, PRESETS[args.model], args.layers)
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
    paths = write_results(rows, meta, out)
    print(markdown_table(rows))
    print("\ntargets (reported, not enforced):")
    for line in target_checks(rows):
        print(f"  {line}")
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    if is_missing("matplotlib"):
        print(f"no plots: matplotlib is not installed here ({install_hint('bench')})")
    return 0


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


def run_demo(args) -> int:
    """`tokprune demo`: every check that needs no model first (methods, budgets, numbers, device, --out),
    then the answerer, the settings on it, and the held-out questions."""
    import torch

    from tokprune.methods import make_method
    from tokprune.toy import demo, report
    from tokprune.toy.task import generate
    from tokprune.toy.train import HELD_OUT_SEED

    out = check_out_dir(args.out)
    methods = split_list(args.methods)
    for method in methods:
        make_method(method, {})
    budgets = [parse_budget(b) for b in split_list(args.budgets)] or [
        {"keep_ratio": r} for r in demo.KEEP_RATIOS
    ]
    for name, value in (("--questions", args.questions), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CliError(f"{name} must be >= 1")
    check_device(args.device)
    answerer = _demo_answerer(args)
    skipped: list[str] = []
    if not methods:  # every registered method this model can run (AnyRes-only ones need tiles)
        methods = _runnable(tokprune.available_methods(), answerer.model)
        skipped = sorted(set(tokprune.available_methods()) - set(methods))
        if skipped:
            print(f"skipped (need AnyRes tiles, which this model has not): {', '.join(skipped)}")
    settings = [(None, {})] + [(m, b) for m in methods for b in budgets]
    demo.check_settings(answerer.model, settings)  # bad budgets / refused methods fail before any run
    samples = generate(args.questions, HELD_OUT_SEED)
    print(
        f"{len(settings)} settings x {len(samples)} held-out questions on {args.model} ({args.device}, "
        f"{args.dtype})",
        flush=True,
    )

    def progress(row):
        print(f"  {row.method:<14} {row.budget:<12} accuracy {100 * row.accuracy:5.1f}%", flush=True)

    start = time.perf_counter()
    rows = demo.run_settings(answerer, samples, settings, args.batch_size, progress)
    meta = {
        "model": args.model,
        "questions": len(samples),
        "dtype": args.dtype,
        "attn": args.attn,
        "batch_size": args.batch_size,
        "device": _device_name(args.device),
        "threads": torch.get_num_threads(),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - start, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print("\n" + report.table(rows))
    grids = demo.token_grids(answerer, samples[: demo.N_PICTURES])
    paths = report.write_report(rows, samples, meta, out, grids)
    if "picture" not in paths:
        print(
            f"\nno kept-tokens picture: {args.model}'s visual tokens are not one plain grid per image "
            "(AnyRes tiles, row separators or another layout)"
        )
    print(f"\n{meta['seconds']} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _demo_answerer(args):
    """The demo's answerer on --model in --dtype / --attn, on --device (left padding, eval mode)."""
    import torch

    from tokprune.eval.loading import prepare
    from tokprune.toy import demo

    model, processor = load_checkpoint(args.model, args.dtype, args.attn)
    model = prepare(model, processor, torch.device(args.device))
    if args.model == "toy":
        return demo.ToyAnswerer(model, processor)
    return demo.ChatAnswerer(model, processor)


def run_robustness(args) -> int:
    """`tokprune robustness`: arguments and method options checked first, then the model and, per method,
    the mean Jaccard overlap of the kept sets under input noise."""
    from tokprune.bench.presets import PRESETS
    from tokprune.robustness import check_stability_arguments, kept_set_stability

    check_stability_arguments(args.noise_std, args.trials)  # bad numbers fail before any model loads
    budget = parse_budget(args.budget)
    methods = split_list(args.methods) or tokprune.available_methods()
    options = method_options(methods, args.option)
    built = make_methods(options)  # unknown names / options fail here too
    if args.model in PRESETS and split_list(args.methods):  # before its weights are built
        check_on_preset(built, PRESETS[args.model], args.layers)
    model, make_inputs = load_model(args.model, args.layers, args.attn, args.dtype, args.device)
    runnable = methods if split_list(args.methods) else _runnable(methods, model)  # named ones say why
    inputs = make_inputs(1)
    print(
        f"kept-set stability: mean Jaccard of the kept positions over {args.trials} noisy copies "
        f"(std {args.noise_std}), {args.budget}"
    )
    for method in methods:
        if method not in runnable:
            print(f"  {method:<13} n/a (needs AnyRes tiles; {type(model).__name__} has none)")
            continue
        result = kept_set_stability(
            model, inputs, method, noise_std=args.noise_std, trials=args.trials, **budget, **options[method]
        )
        line = f"  {method:<13} mean {result['mean_jaccard']:.3f}  min {result['min_jaccard']:.3f}"
        if result["input_independent"]:
            line += "  fixed by construction (unrelated images keep the same positions)"
        print(line)
    print("(positions only: what merging methods write into the kept tokens is not compared)")
    return 0


def _runnable(methods: list[str], model) -> list[str]:
    """`methods` without those the model refuses: AnyRes-only methods (`needs_tiles`) on models whose
    images have no tiles. For the default "every method" lists; named methods fail with the reason."""
    from tokprune.methods import REGISTRY
    from tokprune.patches import adapter_for

    tiles = adapter_for(model).tiles
    return [m for m in methods if tiles or not REGISTRY[m].needs_tiles]


def print_methods() -> int:
    """The catalogue: name, family, where it acts, default budget, paper; then its options' defaults."""
    from tokprune.methods import catalogue

    entries = catalogue()
    widths = {key: max(len(e[key]) for e in entries) for key in ("name", "family", "acts", "default")}
    for e in entries:
        print("  ".join(f"{e[key]:<{widths[key]}}" for key in widths) + f"  {e['paper']}")
        if e["options"]:
            options = " ".join(f"{k}={v!r}" for k, v in e["options"].items())
            print(f"{'':<{widths['name']}}  options: {options}")
    return 0


def print_models() -> int:
    from tokprune.bench.presets import PRESETS

    print("supported model classes and their families:")
    families = tokprune.model_families()
    width = max(map(len, families))
    for name, family in families.items():
        print(f"  {name:<{width}}  {family}")
    print("benchmark presets (random weights, real shapes):")
    for preset in PRESETS.values():
        print(f"  {preset.name:<15} {preset.description}")
    return 0
