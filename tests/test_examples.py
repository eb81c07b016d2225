"""The scripts in examples/: each runs offline in a subprocess and prints what its docstring claims.

Every file in examples/ must have a case here (`test_every_example_is_covered`). Python examples run with
small sizes (few new tokens, small budgets) and their printed token counts are checked against the
budget rules; the shell examples are checked for syntax and, through their DRY_RUN=1 mode, for a command
line the current CLI / lmms-eval plugin accepts; running them end to end is `slow`. The custom method of
examples/custom_method.py also goes through the invariant matrix of tests/test_invariants.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_models import BUILDERS

import tokprune
from tokprune.methods import REGISTRY

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BIN = Path(sys.executable).parent  # tokprune, lmms-eval and python of this environment
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
N_TOY = 196  # visual tokens per image of the shipped toy


def run(command: list[str], timeout: int = 300, **env: str) -> str:
    """stdout + stderr of `command` run offline from the repository root; fails on a non-zero exit."""
    environment = {**os.environ, **OFFLINE, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    done = subprocess.run(
        command, cwd=EXAMPLES.parent, env=environment, capture_output=True, text=True, timeout=timeout
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{output[-4000:]}"
    return output


def numbers(pattern: str, output: str) -> list[tuple[int, ...]]:
    """Every match of `pattern` in `output`, its groups as ints; fails when nothing matches."""
    found = [tuple(int(g) for g in m.groups()) for m in re.finditer(pattern, output)]
    assert found, f"no line matches {pattern!r} in:\n{output[-3000:]}"
    return found


def check_quickstart(out: str) -> None:
    assert numbers(r"visual tokens in: (\d+), kept: (\d+)", out) == [(N_TOY, 40)]
    layers = [int(x) for x in re.search(r"tokens per LLM layer: \[([\d, ]+)\]", out).group(1).split(",")]
    assert len(layers) == 4 and len(set(layers)) == 1  # a pre-LLM method: every layer sees the same tokens
    assert re.search(r"^answer: \S+", out, re.M) and re.search(r"scoring time: [\d.]+ ms", out)


def check_several_images(out: str) -> None:
    rows = numbers(r"row (\d+): images: (\d+), visual tokens in: (\d+), kept: (\d+)", out)
    assert rows == [(0, 2, 2 * N_TOY, 2 * 16), (1, 1, N_TOY, 16)]  # the budget counts per image


def check_video(out: str) -> None:
    assert "RANDOM weights" in out  # the tiny model is announced as such
    counts = numbers(r"video_budget='(?:frame|clip)': frames \(temporal slices\): (\d+), budget: (\d+), "
                     r"visual tokens in: (\d+), kept: (\d+)", out)  # fmt: skip
    (frames, budget, n, per_frame), (_, _, _, per_clip) = counts
    assert (frames, budget, n) == (4, 3, 64)  # 8 frames of 112 px: 4 slices of 4 x 4 tokens
    assert per_frame == min(budget * frames, n) and per_clip == min(budget, n)
    assert len(re.findall(r"^video_budget='frame'", out, re.M)) == 1
    assert len(re.findall(r"^video_budget='clip'", out, re.M)) == 1


def check_multiturn(out: str) -> None:
    assert numbers(r"turn (\d): new images: (\d), cache", out) == [(1, 1), (2, 0), (3, 1)]
    lengths = [[int(x) for x in line.split(",")] for line in re.findall(r"per layer: \[([\d, ]+)\]", out)]
    for layers in lengths:  # fastv at its default layer 2: layers 2 and 3 hold 196 - 20 tokens fewer
        assert layers[0] == layers[1] and layers[2] == layers[3] and layers[0] - layers[2] >= N_TOY - 20
    assert all(a[0] < b[0] and a[2] < b[2] for a, b in zip(lengths, lengths[1:]))  # the cache grows
    assert numbers(r"turn (\d): visual tokens in: (\d+), kept: (\d+)", out) == [
        (1, N_TOY, 20),
        (3, N_TOY, 20),
    ]


def check_composition(out: str) -> None:
    stages = re.findall(r"stage (\w+) \((\S+)\): kept (\d+)", out)
    assert stages == [("visionzip", "pre", "64"), ("fastv", "llm@1", "16")]
    layers = [int(x) for x in re.search(r"tokens per LLM layer: \[([\d, ]+)\]", out).group(1).split(",")]
    text = layers[0] - 64
    assert layers == [text + 64, text + 16, text + 16, text + 16]
    assert "refused as expected: compose at most one pre-LLM method" in out


def check_custom_method(out: str) -> None:
    assert numbers(r"ClsExplore\(explore=0.5\): visual tokens in: (\d+), kept: (\d+)", out) == [(N_TOY, 30)]
    kept = json.loads(re.search(r"kept token indices: (\[[\d, ]*\])", out).group(1))
    assert len(kept) == len(set(kept)) == 30 and kept == sorted(kept) and kept[-1] < N_TOY
    assert numbers(r"by name: cls_explore keeps (\d+) of (\d+)", out) == [(98, N_TOY)]
    assert "registered: True" in out
    assert "keep_ratio=1.0 identical to the unpatched model: True" in out
    assert "restored after the with block: True" in out
    assert "refused as expected: cls_explore: explore must be a number in [0, 1)" in out


# script: (arguments, what its output must show)
PYTHON_EXAMPLES: dict[str, tuple[list[str], Callable[[str], None]]] = {
    "quickstart.py": (["--budget", "40", "--max-new-tokens", "2"], check_quickstart),
    "several_images.py": (["--budget", "16", "--max-new-tokens", "2"], check_several_images),
    "video.py": (["--budget", "3", "--max-new-tokens", "2"], check_video),
    "multiturn.py": (["--method", "fastv", "--budget", "20", "--max-new-tokens", "2"], check_multiturn),
    "composition.py": (["--pre-budget", "64", "--layer", "1", "--budget", "16"], check_composition),
    "custom_method.py": (["--explore", "0.5", "--budget", "30"], check_custom_method),
}
SHELL_EXAMPLES = ("bench.sh", "lmms_eval.sh")


def test_every_example_is_covered():
    """A new file in examples/ needs a case in this module (a python example in PYTHON_EXAMPLES, a shell
    one in SHELL_EXAMPLES with its own tests)."""
    files = {p.name for p in EXAMPLES.iterdir() if p.name != "__pycache__"}
    assert files == set(PYTHON_EXAMPLES) | set(SHELL_EXAMPLES)


_OUTPUTS: dict[str, str] = {}


def example_output(script: str) -> str:
    """What the example printed with its test arguments (run once per session)."""
    if script not in _OUTPUTS:
        _OUTPUTS[script] = run([sys.executable, str(EXAMPLES / script), *PYTHON_EXAMPLES[script][0]])
    return _OUTPUTS[script]


@pytest.mark.parametrize("script", sorted(PYTHON_EXAMPLES))
def test_python_example(script):
    PYTHON_EXAMPLES[script][1](example_output(script))


def test_multiturn_uses_the_current_cache_api():
    """The example passes `cache=` and reads `out.cache`; no deprecation warning may come from it or from
    tokprune under it."""
    assert "deprecated" not in example_output("multiturn.py")


@pytest.mark.parametrize("script", sorted(PYTHON_EXAMPLES))
def test_python_example_documents_itself(script):
    """A module docstring that says how to run it, and --model for real checkpoints."""
    text = (EXAMPLES / script).read_text()
    docstring = re.match(r'"""(.+?)"""', text, re.S)
    assert docstring and f"python examples/{script}" in docstring.group(1)
    assert "--model" in docstring.group(1) and '"--model"' in text


# ----------------------------------------------------------------------------- --model <local folder>

# a LLaVA-style chat template, so that the examples take their chat-template path
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
N_TINY = 49  # visual tokens per image of tests/tiny_models.py's LLaVA


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny random LLaVA of the test suite saved as a checkpoint folder, with a chat template."""
    model, processor = BUILDERS["llava"]("sdpa")
    folder = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(folder)
    processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(folder)
    return folder


# script: (arguments, a pattern of its output, the numbers of every match)
KEPT = r"visual tokens in: (\d+), kept: (\d+)"
SHORT = ["--max-new-tokens", "2"]
ON_A_CHECKPOINT = {
    "quickstart.py": (["--budget", "20", *SHORT], KEPT, [(N_TINY, 20)]),
    "several_images.py": (
        ["--budget", "10", *SHORT], r"row (\d+): images: (\d+), visual tokens in: (\d+), kept: (\d+)",
        [(0, 2, 2 * N_TINY, 20), (1, 1, N_TINY, 10)],
    ),
    "multiturn.py": (["--budget", "12", *SHORT], r"turn (\d): " + KEPT, [(1, N_TINY, 12), (3, N_TINY, 12)]),
    "composition.py": (
        ["--pre-budget", "32", "--layer", "1", "--budget", "8", *SHORT],
        r"stage \w+ \((?:pre|llm@1)\): kept (\d+)", [(32,), (8,)],
    ),
    "custom_method.py": (["--budget", "20"], KEPT, [(N_TINY, 20)]),
}  # fmt: skip


@pytest.mark.parametrize("script", sorted(ON_A_CHECKPOINT))
def test_python_example_on_a_local_checkpoint(checkpoint, script):
    """--model <folder>: the Auto classes load it and the prompt comes from the processor's chat template."""
    arguments, pattern, expected = ON_A_CHECKPOINT[script]
    out = run([sys.executable, str(EXAMPLES / script), "--model", str(checkpoint), *arguments])
    assert numbers(pattern, out) == expected


# ----------------------------------------------------------------------------- custom method in the matrix


@pytest.fixture
def registered_custom_method(monkeypatch):
    """The example's ClsExplore registered (for this test only), as the invariant matrix takes names."""
    spec = importlib.util.spec_from_file_location("custom_method_example", EXAMPLES / "custom_method.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    cls = module.ClsExplore
    monkeypatch.setitem(REGISTRY, cls.name, cls)
    assert cls.name in tokprune.available_methods()
    return cls.name


def _invariants(tiny, method: str, family: str, attn: str) -> None:
    from test_invariants import LAYOUTS, test_keep_all_is_bit_identical, test_pruned_equals_masked_reference

    test_keep_all_is_bit_identical(tiny, family, attn, method)
    for layout in LAYOUTS:  # one and two images per row; a text-only row beside an image row
        test_pruned_equals_masked_reference(tiny, family, attn, method, layout)


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("eager", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_custom_method_passes_the_invariants(tiny, registered_custom_method, family, attn):
    """What every registered method gets: keep-all bit-identical; pruned = the masked reference (prefill,
    every decode step, exact token counts per layer, batches of 2 with left padding); remove() restores."""
    _invariants(tiny, registered_custom_method, family, attn)


# ----------------------------------------------------------------------------- shell examples


@pytest.mark.parametrize("script", SHELL_EXAMPLES)
def test_shell_example_parses(script):
    run(["bash", "-n", str(EXAMPLES / script)])
    header = (EXAMPLES / script).read_text().splitlines()[1:4]
    assert all(line.startswith("#") for line in header)  # documented


def dry_run(script: str, **env: str) -> list[str]:
    """The command a shell example would run (its DRY_RUN=1 mode), as an argument list."""
    return shlex.split(run(["bash", str(EXAMPLES / script)], DRY_RUN="1", **env).strip())


def test_bench_command_is_valid():
    from tokprune.cli import build_parser, parse_budget

    argv = dry_run("bench.sh")
    assert argv[:2] == ["tokprune", "bench"]
    args = build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown or malformed option
    assert args.model == "toy" and args.repeats * (args.warmup + 1) <= 4 and args.max_new_tokens <= 4
    assert set(args.methods) <= set(tokprune.available_methods())
    assert [parse_budget(b) for b in args.budgets] == [{"budget": 49}]
    extra = dry_run("bench.sh", MODEL="llava-1.5-7b", OUT="/tmp/x")  # environment and extra arguments
    assert extra[extra.index("--model") + 1] == "llava-1.5-7b" and extra[extra.index("--out") + 1] == "/tmp/x"


@pytest.mark.slow
def test_bench_runs(tmp_path):
    """The toy, three methods, two repeats: 15 s on an idle 2-core CPU, 40 s on a busy one."""
    run(["bash", str(EXAMPLES / "bench.sh"), "--no-progress"], OUT=str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["setting"] for r in results] == ["baseline", "visionzip@49", "divprune@49", "fastv@49"]
    into_llm = {r["method"]: r["visual_tokens_into_llm"] for r in results}
    assert into_llm == {"baseline": N_TOY, "visionzip": 49, "divprune": 49, "fastv": N_TOY}
    assert next(r for r in results if r["method"] == "fastv")["visual_tokens_final"] == 49
    assert {"results.md", "results.csv", "prefill_speedup.png", "flops.png"} <= {
        p.name for p in tmp_path.iterdir()
    }


def _lmms_eval():
    if os.environ.get("TOKPRUNE_REQUIRE_EVAL"):  # `make test`: the eval extra must be there
        import lmms_eval

        return lmms_eval
    return pytest.importorskip("lmms_eval")


def _model_args(argv: list[str]) -> dict:
    from lmms_eval.utils import simple_parse_args_string

    return simple_parse_args_string(argv[argv.index("--model_args") + 1])


# (environment of the script, what the plugin must get: methods, budget, options, options per stage)
LMMS_SETTINGS = [
    ({}, ["divprune"], {"keep_ratio": 0.25}, {}, {}),
    ({"METHOD": "fastv", "BUDGET": "64", "EXTRA": "layer=3"}, ["fastv"], {"budget": 64}, {"layer": 3}, {}),
    ({"METHOD": "none"}, [], {}, {}, {}),
    (
        {"METHOD": "visionzip+fastv", "BUDGET": "32", "EXTRA": "fastv.layer=2,visionzip.budget=98"},
        ["visionzip", "fastv"], {"budget": 32}, {}, {"fastv": {"layer": 2}, "visionzip": {"budget": 98}},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("env", "methods", "count", "options", "stages"), LMMS_SETTINGS)
def test_lmms_eval_command_is_valid(env, methods, count, options, stages):
    """The printed command's model_args pass the plugin's own checks (`tokprune.eval.args.run_args`, which
    raises on a key or value it does not take), parsed as lmms-eval parses them; the task is packaged."""
    _lmms_eval()
    from tokprune.eval import task_dir
    from tokprune.eval.args import run_args

    argv = dry_run("lmms_eval.sh", **env)
    assert argv[:3] == ["lmms-eval", "--model", "tokprune"] and "DEBUG" in argv
    parsed = run_args(**_model_args(argv))
    assert parsed.load.pretrained == "toy" and parsed.load.device == "cpu"
    prune = parsed.prune
    assert prune.method == methods
    assert {k: getattr(prune, k) for k in ("budget", "keep_ratio") if getattr(prune, k) is not None} == count
    assert prune.options == options and prune.stage_options == stages
    tasks = argv[argv.index("--tasks") + 1].split(",")
    assert all((task_dir() / "tokprune_toyvqa" / f"{task}.yaml").exists() for task in tasks)


@pytest.mark.slow
def test_lmms_eval_runs():
    """The whole evaluation on 2 questions of the toy task (about 40 s on a 2-core CPU)."""
    _lmms_eval()
    out = run(["bash", str(EXAMPLES / "lmms_eval.sh")], timeout=600, LIMIT="2")
    assert "|tokprune_toyvqa|" in out
    assert re.search(r"avg_visual_tokens_kept\s*\|\s*49\.0000", out)  # ceil(0.25 * 196)
