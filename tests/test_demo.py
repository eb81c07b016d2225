"""`tokprune demo` and the trained toy VLM it runs on.

The quality bounds are the demo table recorded on 2026-12-07 with the shipped weights
(`benchmarks/results/demo_toy_cpu_2026-12-07/demo.md`, 200 held-out questions, unpruned 92.0%), each
lowered by a margin of 5 points of share (about 9 of the 184 questions the unpruned model answers). The
shipped weights reach 0.926 held-out accuracy on 500 questions (`tokprune/toy/weights/TRAINING.md`;
issue 4's target is 0.90). The tests need the tracked weights: without them they fail, they do not skip.
"""

import json
import time

import numpy as np
import pytest
import torch

from tokprune import cli
from tokprune.toy import demo, report
from tokprune.toy.model import N_VISUAL, WEIGHTS, load_toy
from tokprune.toy.task import generate
from tokprune.toy.train import HELD_OUT_SEED, accuracy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UNPRUNED_MIN = 0.90  # recorded 0.926 on 500 held-out questions (TRAINING.md; issue 4's target)
MARGIN = 0.05  # share of the unpruned accuracy below the recorded one a method may fall
# recorded share of the unpruned accuracy at keep 1/4 (demo_toy_cpu_2026-12-07/demo.md)
RECORDED_SHARE_AT_QUARTER = {"divprune": 0.995, "visionzip": 0.908, "fastervlm": 0.897}
RANDOM_SHARE_AT_EIGHTH = 0.766  # recorded: random pruning to an eighth loses accuracy (70.5% vs 92.0%)


@pytest.fixture(scope="module")
def toy():
    return load_toy()


def test_shipped_weights_are_tracked_small_and_load_offline():
    assert (WEIGHTS / "model.safetensors").exists(), "the trained toy weights must ship in the package"
    assert (WEIGHTS / "model.safetensors").stat().st_size <= 25 * 2**20
    model, processor = load_toy()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    ids = processor.tokenizer("USER: <image> what color is the square ? ASSISTANT:")["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids


@pytest.mark.slow
def test_unpruned_toy_reaches_its_recorded_accuracy(toy):
    model, processor = toy
    assert accuracy(model, processor, generate(500, HELD_OUT_SEED)) >= UNPRUNED_MIN


@pytest.mark.slow
def test_methods_keep_their_recorded_share_at_a_quarter_of_the_tokens(toy):
    model, processor = toy
    samples = generate(200, HELD_OUT_SEED)
    methods = list(RECORDED_SHARE_AT_QUARTER)
    settings = [(None, {})] + [(m, {"keep_ratio": 0.25}) for m in methods]
    settings.append(("random", {"keep_ratio": 0.125}))
    base, *pruned, rand = demo.run_settings(
        demo.ToyAnswerer(model, processor), samples, settings, batch_size=100
    )
    shares = {row.method: row.accuracy / base.accuracy for row in pruned}
    floors = {m: share - MARGIN for m, share in RECORDED_SHARE_AT_QUARTER.items()}
    assert all(shares[m] >= floors[m] for m in methods), (shares, floors)
    # pruning matters on this task: random pruning to an eighth loses accuracy
    assert rand.accuracy / base.accuracy <= RANDOM_SHARE_AT_EIGHTH + MARGIN


@pytest.mark.slow
def test_demo_command_on_a_handful_of_questions(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(
        ["demo", "--questions", "6", "--batch-size", "3", "--methods", "fastv", "visionzip", "pdrop",
         "--budgets", "0.25", "16", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| unpruned | all |" in printed and "| visionzip | keep 0.25 |" in printed
    assert "| pdrop | 16 tokens |" in printed
    data = json.loads((out / "demo.json").read_text())
    assert data["meta"]["dtype"] == "float32" and data["meta"]["batch_size"] == 3
    rows = {(r["method"], r["budget"]): r for r in data["rows"]}
    assert len(rows) == 1 + 3 * 2 and all(r["total"] == 6 for r in rows.values())
    assert rows[("unpruned", "all")]["visual_to_llm"] == N_VISUAL
    assert rows[("visionzip", "keep 0.25")]["visual_to_llm"] == 49
    assert rows[("fastv", "keep 0.25")]["visual_to_llm"] == N_VISUAL  # in-LLM: all enter, fewer on average
    assert rows[("fastv", "keep 0.25")]["visual_layer_avg"] < N_VISUAL
    assert rows[("visionzip", "16 tokens")]["flops"] < rows[("unpruned", "all")]["flops"]
    # the pictured questions span both batches of 3: every setting records all four of them, the
    # unpruned row every token, a pruned row exactly its final count
    expected = {"all": N_VISUAL, "keep 0.25": 49, "16 tokens": 16}
    for (method, budget), row in rows.items():
        assert len(row["kept"]) == demo.N_PICTURES, (method, budget)
        assert all(len(kept) == expected[budget] for kept in row["kept"]), (method, budget)
    assert all(kept == list(range(N_VISUAL)) for kept in rows[("unpruned", "all")]["kept"])
    for name in ("accuracy_vs_tokens.png", "kept_tokens.png"):
        png = (out / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 5000


def test_dtype_applies_to_the_toy_and_is_recorded(tmp_path, monkeypatch):
    seen = {}
    real_run = demo.run_settings

    def spy(answerer, samples, settings, *args, **kwargs):
        seen["dtype"] = answerer.model.dtype
        seen["pixels"] = answerer.inputs(samples[:1])["pixel_values"].dtype
        return real_run(answerer, samples, settings, *args, **kwargs)

    monkeypatch.setattr(demo, "run_settings", spy)
    out = tmp_path / "demo"
    args = ["demo", "--dtype", "bfloat16", "--questions", "2", "--methods", "pool", "--budgets", "0.25"]
    assert cli.main([*args, "--out", str(out)]) == 0
    assert seen == {"dtype": torch.bfloat16, "pixels": torch.bfloat16}
    meta = json.loads((out / "demo.json").read_text())["meta"]
    assert meta["dtype"] == "bfloat16" and meta["attn"] == "sdpa"
    assert '"dtype": "bfloat16"' in (out / "demo.md").read_text()


# --------------------------------------------------------------------------------- bad input, up front
@pytest.fixture
def no_run(monkeypatch):
    """Any answering pass fails the test: bad input must be refused before the unpruned pass."""
    monkeypatch.setattr(demo, "run_settings", lambda *a, **k: pytest.fail("the demo ran before refusing"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "nosuchmethod"], "unknown method 'nosuchmethod'"),
        (["--methods", "fastv", "--budgets", "lots"], "budget 'lots'"),
        (["--questions", "0"], "--questions must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--methods", "visionzip", "--budgets", "0"], "budget must be a positive int"),
        (["--methods", "visionzip", "--budgets", "-3"], "budget must be a positive int"),
        (["--methods", "visionzip", "--budgets", "1.5"], "keep_ratio must be in (0, 1]"),
        (["--methods", "visionzip", "fastv", "--budgets", "0.25", "0"], "got 0"),
        (["--methods", "hired", "--budgets", "0.25"], "hired needs AnyRes images"),
        (["--model", "/nonexistent/path"], "unknown model '/nonexistent/path'"),
        (["--model", "/nonexistent"], "cannot load '/nonexistent'"),
        (
            ["--model", "tokprune-no-such-org/no-such-model"],
            "cannot load 'tokprune-no-such-org/no-such-model'",
        ),
        (["--device", "cuda"], "--device cuda: this torch"),
        (["--device", "cuda:7"], "--device cuda:7: this torch"),
        (["--device", "gpu"], "--device 'gpu' is not a torch device"),
    ],
)
def test_bad_input_is_one_line_before_any_run(args, message, no_run, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU build, on any machine
    assert cli.main(["demo", *args]) == 2
    err = capsys.readouterr().err  # transformers' "Loading weights" progress bar may come first
    last = err.strip().splitlines()[-1]
    assert last.startswith("tokprune: error: ") and message in last and "Traceback" not in err


def test_missing_matplotlib_names_the_extra_before_any_run(no_run, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    monkeypatch.setattr(cli.commands, "_demo_answerer", lambda args: pytest.fail("loaded a model first"))
    assert cli.main(["demo", "--questions", "2"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'tokprune[demo]'" in err


# --------------------------------------------------------------------------------- report pieces
def test_dimmed_darkens_exactly_the_dropped_cells():
    image = np.full((16, 16, 3), 200, dtype=np.uint8)
    out = report.dimmed(image, kept=[0, 3], grid=(2, 2))
    assert (out[:8, :8] == 200).all() and (out[8:, 8:] == 200).all()
    assert (out[:8, 8:] == 40).all() and (out[8:, :8] == 40).all()
    # a grid that does not divide the image: every pixel belongs to the cell it lies in
    wide = report.dimmed(np.full((14, 21, 3), 100, dtype=np.uint8), kept=[2], grid=(2, 3))
    assert (wide[:7, 14:] == 100).all() and (wide[:7, :14] == 20).all() and (wide[7:] == 20).all()


def test_pictured_rows_fall_back_to_the_budget_that_was_run():
    rows = [demo.DemoRow("unpruned", "all")] + [
        demo.DemoRow(m, b) for m in ("pool", "fastv") for b in ("64 tokens", "32 tokens")
    ]
    assert [(r.method, r.budget) for r in report.pictured_rows(rows)] == [
        ("unpruned", "all"), ("pool", "64 tokens"), ("fastv", "64 tokens"),
    ]  # fmt: skip
    rows.append(demo.DemoRow("pool", "keep 0.25"))
    assert [r.budget for r in report.pictured_rows(rows)] == ["all", "keep 0.25"]
    assert report.pictured_rows(rows[:1]) == rows[:1]


def test_table_reports_share_of_unpruned_and_measured_speedup():
    base = demo.DemoRow("unpruned", "all", correct=8, total=10, visual_to_llm=196, visual_layer_avg=196,
                        flops=2e9, seconds=2.0)  # fmt: skip
    half = demo.DemoRow("pool", "keep 0.5", correct=6, total=10, visual_to_llm=98, visual_layer_avg=98,
                        flops=1e9, seconds=1.0)  # fmt: skip
    lines = report.table([base, half]).splitlines()
    assert lines[3] == "| pool | keep 0.5 | 60.0% | 75.0% | 98.0 | 98.0 | 1.000 | 2.00× |"


def test_toy_answerer_scores_single_word_answers_and_its_grid():
    """The answerer's argmax path on an untrained toy gives one vocabulary word per question."""
    from transformers import LlavaForConditionalGeneration

    from tokprune.toy.model import toy_config, toy_processor

    torch.manual_seed(0)
    processor = toy_processor()
    model = LlavaForConditionalGeneration(toy_config(processor)).eval()
    answerer = demo.ToyAnswerer(model, processor)
    samples = generate(3, 7)
    with torch.no_grad():
        answers, seconds = answerer.answer(answerer.inputs(samples))
    assert len(answers) == 3 and all(a in processor.tokenizer.get_vocab() for a in answers) and seconds > 0
    assert demo.token_grids(answerer, samples) == [(14, 14)] * 3


# --------------------------------------------------------------------------------- a real model's path
CHAT_TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny random LLaVA-1.5 (7x7 = 49 tokens per image) saved as a checkpoint, with a chat template."""
    import copy

    from tiny_models import tiny_llava

    model, processor = tiny_llava()
    processor = copy.deepcopy(processor)
    processor.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_demo_on_a_real_checkpoint_folder(llava_dir, tmp_path, capsys):
    """`--model <folder>`: the chat path, FLOPs from tokprune.flops, the picture on the model's own grid."""
    out = tmp_path / "demo"
    args = ["demo", "--model", str(llava_dir), "--questions", "5", "--batch-size", "2", "--methods", "visionzip",
            "fastv", "--budgets", "0.25", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    assert "| visionzip | keep 0.25 |" in capsys.readouterr().out
    rows = {r["method"]: r for r in json.loads((out / "demo.json").read_text())["rows"]}
    assert rows["unpruned"]["visual_to_llm"] == 49 and rows["visionzip"]["visual_to_llm"] == 13
    assert 0 < rows["visionzip"]["flops"] < rows["unpruned"]["flops"]
    assert all(r["seconds"] > 0 and r["total"] == 5 for r in rows.values())
    assert rows["unpruned"]["kept"] == [list(range(49))] * demo.N_PICTURES
    assert all(len(k) == 13 for r in ("visionzip", "fastv") for k in rows[r]["kept"])
    assert (out / "kept_tokens.png").read_bytes().startswith(PNG_SIGNATURE)


def test_chat_answerer_times_the_prefill_only(llava_dir):
    """The prefill time covers the first forward and ends before the first decode step starts."""
    from tokprune.eval.loading import load_pretrained, prepare

    model, processor = load_pretrained(str(llava_dir), "float32")
    answerer = demo.ChatAnswerer(prepare(model, processor, torch.device("cpu")), processor, max_new_tokens=3)
    inputs = answerer.inputs(generate(2, 3))
    starts, ends = [], []
    hooks = [
        model.register_forward_pre_hook(lambda *a: starts.append(time.perf_counter())),
        model.register_forward_hook(lambda *a: ends.append(time.perf_counter())),
    ]
    try:
        before = time.perf_counter()
        with torch.no_grad():
            answers, prefill = answerer.answer(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(answers) == 2 and len(starts) == 3  # the prefill and two decode steps
    assert ends[0] - starts[0] <= prefill <= starts[1] - before


def test_no_picture_where_tokens_form_no_plain_grid(tiny):
    """LLaVA-NeXT's AnyRes tiles and row separators: no grid to draw on (the demo prints a note)."""
    import copy

    model, processor = tiny("llava_next")
    processor = copy.deepcopy(processor)
    processor.chat_template = CHAT_TEMPLATE
    answerer = demo.ChatAnswerer(model, processor)
    assert demo.token_grids(answerer, generate(2, 3)) == [None, None]
    assert report.picture_kept([demo.DemoRow("unpruned", "all")], generate(2, 3), [None, None], None) is None
