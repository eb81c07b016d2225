"""The `tokprune` command in a user's first hour: --version and `python -m tokprune`, a base install without
the extras, --out and method options refused before any model is built, checkpoints that cannot work
refused at once (a processor without images, an HF id with no Hub in reach), defaults in every --help."""

import json
import re
import subprocess
import sys
import time
from argparse import SUPPRESS, _SubParsersAction
from pathlib import Path

import pytest

from tokprune import cli
from tokprune.cli import commands

ROOT = Path(__file__).resolve().parents[1]
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def _python(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture
def no_model(monkeypatch):
    """Building or loading any model stops the command with a marker error the test can look for."""

    def refuse(*args, **kwargs):
        raise cli.CliError("reached load_model")

    monkeypatch.setattr(commands, "load_model", refuse)
    monkeypatch.setattr(commands, "_demo_answerer", refuse)


# ------------------------------------------------------------------------------ --version, python -m


def test_version_from_the_module_and_the_script():
    """`python -m tokprune --version` and the installed `tokprune --version` print the package version."""
    module = subprocess.run(
        [sys.executable, "-m", "tokprune", "--version"], capture_output=True, text=True, timeout=300
    )
    script = subprocess.run(
        [str(Path(sys.executable).with_name("tokprune")), "--version"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert module.returncode == 0 and script.returncode == 0, module.stderr + script.stderr
    assert module.stdout == script.stdout == f"tokprune {VERSION}\n"


def test_python_m_tokprune_runs_the_same_command():
    """`python -m tokprune` is the `tokprune` command: same parser, same exit status for a usage error."""
    child = subprocess.run([sys.executable, "-m", "tokprune"], capture_output=True, text=True, timeout=300)
    assert child.returncode == 2
    assert (
        child.stderr.startswith("usage: tokprune ")
        and "{demo,bench,robustness,methods,models}" in child.stderr
    )


def test_version_falls_back_to_the_package_attribute(monkeypatch):
    """A source tree that was never installed has no metadata: tokprune.__version__ answers."""
    import importlib.metadata

    import tokprune

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.setattr(tokprune, "__version__", "9.9.9-test")
    assert cli.package_version() == "9.9.9-test"


def test_the_command_line_layer_imports_nothing_heavy():
    """--version and every --help run with torch, transformers, numpy, huggingface_hub, Pillow and matplotlib
    unimportable (the package's own __init__ replaced by a bare namespace): the cli modules import them
    only inside the commands."""
    driver = f"""
import contextlib, io, json, sys, types
package = types.ModuleType("tokprune")
package.__path__ = [{str(ROOT / "tokprune")!r}]
package.__version__ = "0+stub"
sys.modules["tokprune"] = package
for name in ("torch", "transformers", "numpy", "huggingface_hub", "PIL", "matplotlib"):
    sys.modules[name] = None
from tokprune.cli import main
codes = {{}}
for argv in (["--version"], ["--help"], ["bench", "--help"], ["demo", "--help"], ["robustness", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as stop:
            codes[" ".join(argv)] = stop.code
print(json.dumps(codes))
"""
    child = _python(driver, timeout=60)
    assert child.returncode == 0, child.stderr
    codes = json.loads(child.stdout)
    assert set(codes.values()) == {0} and len(codes) == 5, codes


def test_version_and_help_load_neither_torch_nor_transformers():
    """`import tokprune` is lazy: --version and --help answer in a fraction of a second."""
    code = (
        "import sys\nfrom tokprune.cli import main\nfor argv in (['--version'], ['bench', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    child = _python(code, timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines()[-1] == "[]"


# ----------------------------------------------------------------------------------- without the extras

BASE_INSTALL = """
import contextlib, io, json, sys
for name in ("PIL", "matplotlib"):  # a base install: no Pillow, no matplotlib (numpy comes with transformers)
    sys.modules[name] = None
from tokprune.cli import main
results = {}
for argv in (["models"], ["methods"], ["demo"], ["bench", "--model", "llava-1.5-7b"], ["robustness", "--model", "toy"]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results[argv[0]] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
print(json.dumps(results))
"""


def test_base_install_lists_and_names_the_extra_to_install():
    """Without Pillow and matplotlib `models` and `methods` work; `demo`, `bench` and `robustness` stop with
    one line naming the extra and how to install it, never `No module named 'PIL'`."""
    child = _python(BASE_INSTALL)
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout)
    assert results["models"]["code"] == 0 and "llava-1.5-7b" in results["models"]["out"]
    assert results["methods"]["code"] == 0 and "visionzip" in results["methods"]["out"]
    for command, extra in (("demo", "demo"), ("bench", "bench"), ("robustness", "bench")):
        code, err = results[command]["code"], results[command]["err"]
        assert code == 2 and err.count("\n") == 1, (command, err)
        assert f"tokprune {command} needs the '{extra}' extra" in err and "Pillow" in err
        assert f"pip install 'tokprune[{extra}]'" in err
        assert f"pip install -c constraints.txt -e '.[{extra}]'" in err
        assert "No module named" not in err and "Traceback" not in err
    assert "matplotlib" in results["demo"]["err"]


# ----------------------------------------------------------------------------------- --out, up front


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_out_that_is_a_file_is_refused_before_any_model(command, tmp_path, no_model, capsys):
    existing = tmp_path / "results"
    existing.write_text("not a folder")
    model = ["--model", "llava-1.5-7b"] if command == "bench" else []
    assert cli.main([command, *model, "--out", str(existing)]) == 2
    assert f"--out {existing} is a file" in capsys.readouterr().err
    assert cli.main([command, *model, "--out", str(existing / "inside")]) == 2
    assert f"{existing} is a file, so the folder cannot be made" in capsys.readouterr().err
    assert cli.main([command, *model, "--out", str(tmp_path / "new" / "folder")]) == 2
    assert "reached load_model" in capsys.readouterr().err  # a folder that can be made passes


# ------------------------------------------------------------------------ method options and --layers


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--layers", "2", "--methods", "fastv"],
            "fastv: layer=2 must be an int in [1, 1] for this 2-layer LLM",
        ),
        (["--layers", "2", "--methods", "fastv"], "--option fastv.layer=..."),
        (["--layers", "3", "--methods", "mustdrop"], "mustdrop: layer=3 must be an int in [1, 2]"),
        (["--layers", "2", "--methods", "pdrop"], "--option pdrop.layers=..."),
        (["--layers", "0"], "--layers 0: llava-1.5-7b's LLM has 32 layers"),
        (["--layers", "33"], "N in [1, 32]"),
        (["--methods", "hired"], "hired needs AnyRes images"),
    ],
)
def test_bench_checks_methods_against_the_preset_before_building_it(argv, message, no_model, capsys):
    budgets = ["--budgets", "64"] if "--methods" in argv else []
    assert cli.main(["bench", "--model", "llava-1.5-7b", *argv, *budgets]) == 2
    err = capsys.readouterr().err
    assert message in err and "reached load_model" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "llava-1.5-7b", "--layers", "2", "--methods", "fastv", "--option", "fastv.layer=1"],
        ["--model", "llava-1.5-7b", "--layers", "2", "--methods", "fastv", "--option", "layer=1"],
        ["--model", "llava-next-7b", "--methods", "hired"],
        ["--model", "llava-1.5-7b", "--layers", "4", "--methods", "visionzip", "pdrop"],
    ],
)
def test_methods_that_fit_the_preset_go_on_to_build_it(argv, no_model, capsys):
    assert cli.main(["bench", *argv, "--budgets", "64"]) == 2
    assert "reached load_model" in capsys.readouterr().err


def _settings(*argv: str) -> dict:
    args = cli.build_parser().parse_args(["bench", "--model", "llava-1.5-7b", "--budgets", "64", *argv])
    settings, _ = commands.settings_from(args)
    return {s.method: dict(s.options) for s in settings[1:]}


def test_option_for_one_method_or_for_all():
    assert _settings("--methods", "fastv", "visionzip", "--option", "fastv.layer=1") == {
        "fastv": {"layer": 1},
        "visionzip": {},
    }
    assert _settings("--methods", "fastv", "pdrop", "--option", "rounding='ceil'") == {
        "fastv": {"rounding": "ceil"},
        "pdrop": {"rounding": "ceil"},
    }
    # a method's own value wins over the shared one
    both = ("--option", "rounding='ceil'", "--option", "pdrop.rounding='floor'")
    assert _settings("--methods", "fastv", "pdrop", *both) == {
        "fastv": {"rounding": "ceil"},
        "pdrop": {"rounding": "floor"},
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "fastv", "visionzip", "--option", "layer=1"], "visionzip has no option layer"),
        (
            ["--methods", "fastv", "visionzip", "--option", "layer=1"],
            "for fastv only: --option fastv.layer=1",
        ),
        (
            ["--methods", "fastv", "--option", "pdrop.layers=(1,)"],
            "'pdrop' is not one of the methods run (fastv)",
        ),
        (["--methods", "fastv", "--option", "fastv.depth=2"], "fastv has no option depth"),
        (["--option", "layer=1"], "--option sets method options: give --methods"),
    ],
)
def test_options_no_method_run_has_are_errors(argv, message, no_model, capsys):
    budgets = ["--budgets", "64"] if "--methods" in argv else []
    assert cli.main(["bench", "--model", "llava-1.5-7b", *argv, *budgets]) == 2
    err = capsys.readouterr().err
    assert message in err and "reached load_model" not in err


def test_robustness_takes_an_option_for_one_method(capsys):
    argv = [
        "robustness",
        "--model",
        "toy",
        "--methods",
        "fastv,divprune",
        "--budget",
        "0.25",
        "--trials",
        "1",
    ]
    assert cli.main([*argv, "--option", "layer=1"]) == 2
    assert "divprune has no option layer" in capsys.readouterr().err
    assert cli.main([*argv, "--option", "fastv.layer=1"]) == 0
    out = capsys.readouterr().out
    assert "fastv " in out and "divprune " in out


def _subcommands() -> dict:
    parser = cli.build_parser()
    actions = next(a for a in parser._actions if isinstance(a, _SubParsersAction))
    return {"tokprune": parser, **actions.choices}


@pytest.mark.parametrize("name", list(_subcommands()))
def test_every_help_shows_the_defaults(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per option: no default split over two lines
    parser = _subcommands()[name]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.default in (None, [], False, SUPPRESS) or not action.option_strings:
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        assert f"(default: {action.default})" in text, f"{name} {action.option_strings[0]}"


# ---------------------------------------------------------------------- checkpoints that cannot work

CHAT_TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _tiny_llava_folder(path: Path, *, image_processor: bool) -> Path:
    """A tiny LLaVA saved with its processor, or with its tokenizer alone (a tokenizer_config that names
    the tokenizer as processor class: AutoProcessor then returns the bare tokenizer)."""
    import copy

    from tiny_models import tiny_llava

    model, processor = tiny_llava()
    processor = copy.deepcopy(processor)
    processor.chat_template = CHAT_TEMPLATE
    model.save_pretrained(path)
    if image_processor:
        processor.save_pretrained(path)
        return path
    processor.tokenizer.save_pretrained(path)
    config = path / "tokenizer_config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "processor_class": "PreTrainedTokenizerFast"})
    )
    return path


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_a_processor_without_images_is_refused(command, tmp_path, monkeypatch, capsys):
    """Such a folder used to run with one visual token (the placeholder) and print nan%."""
    from transformers import AutoProcessor

    from tokprune.bench import harness
    from tokprune.toy import demo

    folder = _tiny_llava_folder(tmp_path / "model", image_processor=False)
    assert getattr(AutoProcessor.from_pretrained(folder), "image_processor", None) is None
    monkeypatch.setattr(harness, "run_benchmark", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(demo, "run_settings", lambda *a, **k: pytest.fail("answered"))
    argv = [
        command,
        "--model",
        str(folder),
        "--methods",
        "divprune",
        "--budgets",
        "0.5",
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("tokprune: error: ") and "has no image processor" in last


def test_an_hf_id_fails_at_once_offline_or_without_the_hub(monkeypatch, capsys):
    """Not a local folder, not cached: offline mode or an unreachable Hub is an immediate error (it used to
    take huggingface_hub's five retries per file, minutes in all)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", "/nonexistent/tokprune-test-cache")
    argv = ["demo", "--model", "tokprune-no-such-org/no-such-model", "--questions", "2"]
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    assert cli.main(argv) == 2
    assert "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)" in capsys.readouterr().err
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    assert cli.main(argv) == 2
    assert "http://127.0.0.1:9 cannot be reached" in capsys.readouterr().err
    assert time.perf_counter() - start < 10


def test_a_cached_checkpoint_runs_without_the_hub(tmp_path, monkeypatch, capsys):
    """With the Hub unreachable, a checkpoint in the cache loads from it (offline, no retries)."""
    import huggingface_hub.constants as hub

    repo = tmp_path / "cache" / "models--tokprune-test--tiny-llava"
    commit = "0" * 40
    _tiny_llava_folder(repo / "snapshots" / commit, image_processor=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    argv = ["demo", "--model", "tokprune-test/tiny-llava", "--questions", "2", "--batch-size", "2",
            "--methods", "divprune", "--budgets", "0.5", "--out", str(tmp_path / "out")]  # fmt: skip
    start = time.perf_counter()
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "using the cached tokprune-test/tiny-llava" in capsys.readouterr().err
    assert (tmp_path / "out" / "demo.json").exists() and time.perf_counter() - start < 120
    assert hub.HF_HUB_OFFLINE is False  # offline only while it loaded
