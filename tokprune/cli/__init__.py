"""The `tokprune` command: `demo`, `bench`, `robustness`, `methods`, `models`."""

from __future__ import annotations

import argparse
import os
import sys

from tokprune.cli import commands  # light at import: each command imports torch & co. when it runs
from tokprune.cli.arguments import ATTENTION, DTYPES, CliError, parse_budget, parse_option, split_list
from tokprune.cli.commands import _runnable
from tokprune.cli.extras import require_extra
from tokprune.errors import TokpruneError

__all__ = [
    "CliError",
    "_runnable",
    "build_parser",
    "commands",
    "main",
    "package_version",
    "parse_budget",
    "parse_option",
    "split_list",
]

OPTION_HELP = (
    "method option NAME=VALUE for every method run, or METHOD.NAME=VALUE for one (which wins over a shared "
    "value); repeatable, e.g. --option fastv.layer=3"
)
BUDGET_HELP = "tokens per image (64), keep ratios (0.25) or percentages (33.3%%)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to show (None, an empty
    list, a False flag) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, [], False) or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class VersionAction(argparse.Action):
    """`--version`: print `tokprune <version>` and exit (the version is looked up only then)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"tokprune {package_version()}")
        parser.exit()


def package_version() -> str:
    """The installed distribution's version (package metadata); tokprune.__version__ where tokprune runs
    from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokprune")
    except PackageNotFoundError:
        import tokprune

        return tokprune.__version__


def build_parser() -> argparse.ArgumentParser:
    """The command line: the top-level parser (--version) and one subparser per command."""
    parser = argparse.ArgumentParser(prog="tokprune", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action=VersionAction, help="print tokprune's version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_bench(sub)
    _add_robustness(sub)
    sub.add_parser("methods", help="list the registered methods", formatter_class=HelpFormatter)
    sub.add_parser(
        "models",
        help="list supported model classes with their families, and benchmark presets",
        formatter_class=HelpFormatter,
    )
    return parser


def _add_run_options(command: argparse.ArgumentParser) -> None:
    """--attn, --dtype and --device, as every command that runs a model takes them."""
    command.add_argument("--attn", choices=ATTENTION, default="sdpa", help="attention backend")
    command.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype")
    command.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="accuracy against kept tokens of every method on held-out toy VQA questions (offline, CPU)",
        formatter_class=HelpFormatter,
    )
    demo.add_argument(
        "--model",
        default="toy",
        help="'toy' (the trained toy VLM shipped in the package), a local path or an HF id",
    )
    demo.add_argument("--methods", nargs="*", default=[], help="default: every registered method")
    demo.add_argument("--budgets", nargs="*", default=[], help=f"{BUDGET_HELP}; default: keep 0.5 0.25 0.125")
    demo.add_argument("--questions", type=int, default=200, help="held-out questions")
    demo.add_argument("--batch-size", type=int, default=50, help="questions per forward")
    _add_run_options(demo)
    demo.add_argument("--out", default="demo-results", help="folder for the table, plot and picture")


def _add_bench(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure prefill/decode time, memory and FLOPs of methods vs unpruned",
        formatter_class=HelpFormatter,
    )
    bench.add_argument(
        "--model", required=True, help="a preset (see `tokprune models`), a local path or an HF id"
    )
    bench.add_argument(
        "--methods",
        nargs="+",
        default=[],
        help="registered method names, comma or space separated (default: the unpruned baseline only)",
    )
    bench.add_argument("--budgets", nargs="+", default=[], help=f"{BUDGET_HELP}; needed with --methods")
    bench.add_argument("--option", action="append", default=[], help=OPTION_HELP)
    bench.add_argument("--batch-size", type=int, default=1, help="prompts per forward (one image each)")
    bench.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per run")
    bench.add_argument("--repeats", type=int, default=5, help="measured rounds of every setting")
    bench.add_argument("--warmup", type=int, default=1, help="discarded rounds before them")
    _add_run_options(bench)
    bench.add_argument(
        "--layers", type=int, default=None, help="truncate the LLM of a preset to N layers (default: all)"
    )
    bench.add_argument(
        "--eager-baseline",
        action="store_true",
        help="also run in-LLM attention methods the reference-code way (eager attention + output_attentions)",
    )
    bench.add_argument("--out", default="bench-results", help="output folder")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_robustness(sub) -> None:
    robust = sub.add_parser(
        "robustness",
        help="how stable each method's kept set is under input noise",
        formatter_class=HelpFormatter,
    )
    robust.add_argument(
        "--model", required=True, help="a preset, 'toy' (the shipped trained VLM), a local path or an HF id"
    )
    robust.add_argument("--methods", nargs="+", default=[], help="default: every registered method")
    robust.add_argument("--budget", default="64", help="tokens per image (64), keep ratio (0.25) or 33.3%%")
    robust.add_argument("--noise-std", type=float, default=0.01, help="Gaussian noise in normalised pixels")
    robust.add_argument("--trials", type=int, default=5, help="noisy copies per method (>= 1)")
    robust.add_argument("--option", action="append", default=[], help=OPTION_HELP)
    robust.add_argument(
        "--layers", type=int, default=None, help="truncate the LLM of a preset to N layers (default: all)"
    )
    _add_run_options(robust)


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); the exit status (2 for a user error)."""
    args = build_parser().parse_args(argv)
    try:
        require_extra(args.command)  # before the command imports what the extra brings
        return _dispatch(args)
    except (CliError, TokpruneError) as error:
        print(f"tokprune: error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:  # e.g. the toy weights are missing
        print(f"tokprune: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tokprune methods | head`: the reader left; stop quietly, as coreutils do
        _silence_stdout()
        return 141


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command."""
    runs = {
        "demo": commands.run_demo,
        "bench": commands.run_bench,
        "robustness": commands.run_robustness,
        "methods": lambda _: commands.print_methods(),
        "models": lambda _: commands.print_models(),
    }
    return runs[args.command](args)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
