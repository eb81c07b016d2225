"""`tokprune demo` and the trained toy VLM it runs on.

The quality bounds below are measured figures of the shipped weights (see the README's demo table and
`tokprune/toy/weights/TRAINING.md`), with a margin. The shipped weights reach 0.926 held-out accuracy
(500 questions; issue 4's target is 0.90). On the demo's 200 questions (unpruned 92.0%) the best of
divprune / visionzip / fastervlm at keep 1/4 (divprune) kept 99.5% of it, and random pruning at keep 1/8
kept 76.6%: pruning matters on this task.
"""

import json

import numpy as np
import pytest
import torch

from tokprune import cli
from tokprune.toy import demo
from tokprune.toy.model import WEIGHTS, load_toy
from tokprune.toy.task import generate
from tokprune.toy.train import HELD_OUT_SEED, accuracy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UNPRUNED_MIN = 0.90  # measured 0.926 on 500 held-out questions (issue 4's target)
BEST_SHARE_AT_QUARTER = 0.97  # measured 0.995 for divprune at keep 1/4 (visionzip 0.918, fastervlm 0.897)
RANDOM_SHARE_AT_EIGHTH = 0.85  # measured 0.766: random pruning to an eighth loses accuracy

trained = pytest.mark.skipif(
    not (WEIGHTS / "model.safetensors").exists(), reason="no trained toy weights in the package"
)


@pytest.fixture(scope="module")
def toy():
    model, processor = load_toy()
    return model, processor


@trained
def test_shipped_weights_are_small_and_load_offline():
    assert (WEIGHTS / "model.safetensors").stat().st_size <= 25 * 2**20
    model, processor = load_toy()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    ids = processor.tokenizer("USER: <image> what color is the square ? ASSISTANT:")["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids


@trained
@pytest.mark.slow
def test_unpruned_toy_reaches_its_recorded_accuracy(toy):
    model, processor = toy
    assert accuracy(model, processor, generate(500, HELD_OUT_SEED)) >= UNPRUNED_MIN


@trained
@pytest.mark.slow
def test_best_methods_keep_a_recorded_share_at_a_quarter_of_the_tokens(toy):
    model, processor = toy
    samples = generate(200, HELD_OUT_SEED)
    settings = [(None, {})] + [(m, {"keep_ratio": 0.25}) for m in ("visionzip", "divprune", "fastervlm")]
    rows = demo.run_settings(demo.ToyAnswerer(model, processor), samples, settings, batch_size=100)
    base, *pruned = rows
    assert max(r.accuracy for r in pruned) >= BEST_SHARE_AT_QUARTER * base.accuracy
    # pruning matters on this task: random pruning to an eighth loses accuracy (measured 70.5% vs 92.0%)
    (rand,) = demo.run_settings(
        demo.ToyAnswerer(model, processor), samples, [("random", {"keep_ratio": 0.125})], batch_size=100
    )
    assert rand.accuracy < RANDOM_SHARE_AT_EIGHTH * base.accuracy


@trained
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
    rows = {(r["method"], r["budget"]): r for r in data["rows"]}
    assert len(rows) == 1 + 3 * 2 and all(r["total"] == 6 for r in rows.values())
    assert rows[("unpruned", "all")]["visual_to_llm"] == 196
    assert rows[("visionzip", "keep 0.25")]["visual_to_llm"] == 49
    assert rows[("fastv", "keep 0.25")]["visual_to_llm"] == 196  # in-LLM: all enter, fewer on average
    assert rows[("fastv", "keep 0.25")]["visual_layer_avg"] < 196
    assert rows[("visionzip", "16 tokens")]["flops"] < rows[("unpruned", "all")]["flops"]
    assert len(rows[("visionzip", "keep 0.25")]["kept"][0]) == 49
    for name in ("accuracy_vs_tokens.png", "kept_tokens.png"):
        png = (out / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 5000


def test_demo_rejects_unknown_methods_and_bad_budgets(capsys):
    assert cli.main(["demo", "--methods", "nosuchmethod"]) == 2
    assert "unknown method 'nosuchmethod'" in capsys.readouterr().err
    assert cli.main(["demo", "--methods", "fastv", "--budgets", "lots"]) == 2
    assert "budget 'lots'" in capsys.readouterr().err
    assert cli.main(["demo", "--questions", "0"]) == 2


def test_dimmed_darkens_exactly_the_dropped_patches():
    image = np.full((16, 16, 3), 200, dtype=np.uint8)
    out = demo.dimmed(image, kept=[0, 3], patch=8)
    assert (out[:8, :8] == 200).all() and (out[8:, 8:] == 200).all()
    assert (out[:8, 8:] == 40).all() and (out[8:, :8] == 40).all()


def test_table_reports_share_of_unpruned_and_measured_speedup():
    base = demo.DemoRow("unpruned", "all", correct=8, total=10, visual_to_llm=196, visual_layer_avg=196,
                        flops=2e9, seconds=2.0)  # fmt: skip
    half = demo.DemoRow("pool", "keep 0.5", correct=6, total=10, visual_to_llm=98, visual_layer_avg=98,
                        flops=1e9, seconds=1.0)  # fmt: skip
    lines = demo.table([base, half]).splitlines()
    assert lines[3] == "| pool | keep 0.5 | 60.0% | 75.0% | 98.0 | 98.0 | 1.000 | 2.00× |"


def test_toy_answerer_scores_single_word_answers():
    """The answerer's argmax path on an untrained toy gives one vocabulary word per question."""
    from transformers import LlavaForConditionalGeneration

    from tokprune.toy.model import toy_config, toy_processor

    torch.manual_seed(0)
    processor = toy_processor()
    model = LlavaForConditionalGeneration(toy_config(processor)).eval()
    answerer = demo.ToyAnswerer(model, processor)
    samples = generate(3, 7)
    with torch.no_grad():
        answers = answerer.answer(answerer.inputs(samples))
    assert len(answers) == 3 and all(a in processor.tokenizer.get_vocab() for a in answers)
