"""The kept-set stability diagnostic."""

import math

import pytest
import torch
from tiny_models import batch_inputs, text_inputs

from tokprune.errors import UnsupportedInputError
from tokprune.robustness import jaccard, kept_set_stability


def test_jaccard():
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == 0.5
    assert jaccard(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 1.0


def test_stability_bounds_and_extremes(tiny):
    model, proc = tiny("llava")
    inputs = batch_inputs("llava", proc, (1, 2))
    # random ignores the pixels: its kept set never moves
    assert kept_set_stability(model, inputs, "random", keep_ratio=0.25, trials=2)["mean_jaccard"] == 1.0
    # no noise: any deterministic method keeps the same set
    assert (
        kept_set_stability(model, inputs, "fastervlm", keep_ratio=0.25, noise_std=0.0, trials=1)[
            "min_jaccard"
        ]
        == 1.0
    )
    # heavy noise moves an attention ranking
    noisy = kept_set_stability(model, inputs, "fastervlm", keep_ratio=0.25, noise_std=3.0, trials=2)
    assert 0.0 <= noisy["mean_jaccard"] < 1.0 and noisy["visual_kept"] == [13, 26]
    assert not hasattr(model, "_tokprune_pruner")


def test_cli_robustness_on_a_preset(monkeypatch, capsys):
    from tiny_models import tiny_llava

    from tokprune import cli
    from tokprune.bench import presets

    def build(layers, attn, dtype, device):
        model, proc = tiny_llava(attn)
        return model, lambda batch_size: batch_inputs("llava", proc, (1,) * batch_size)

    monkeypatch.setitem(presets.PRESETS, "tiny-llava", presets.Preset("tiny-llava", "test", build))
    argv = [
        "robustness",
        "--model",
        "tiny-llava",
        "--methods",
        "random,fastervlm",
        "--budget",
        "0.25",
        "--trials",
        "2",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "random        mean 1.000" in out and "fastervlm" in out


def test_cli_robustness_on_the_shipped_toy(capsys):
    """`--model toy` runs on the trained toy VLM and a held-out scene of its task."""
    from tokprune import cli

    code = cli.main(
        [
            "robustness",
            "--model",
            "toy",
            "--methods",
            "random",
            "fastervlm",
            "--budget",
            "0.25",
            "--trials",
            "2",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert "random        mean 1.000" in "\n".join(lines)
    fastervlm = next(line for line in lines if "fastervlm" in line)
    assert 0.0 <= float(fastervlm.split("mean")[1].split()[0]) <= 1.0


def test_input_independent_kept_sets_are_detected(tiny):
    """random, pool and ToMe at full matching rounds keep the same positions for any image: flagged, so that
    their 1.0 is not read as robustness; an attention ranking is not flagged."""
    model, proc = tiny("llava")
    inputs = batch_inputs("llava", proc, (1, 2))  # 7 x 7 = 49 tokens per image

    def run(method, **budget):
        return kept_set_stability(model, inputs, method, trials=1, **budget)

    assert run("random", keep_ratio=0.25)["input_independent"]
    assert run("pool", keep_ratio=0.25)["input_independent"]
    # ToMe merges at most floor(t / 2) per round: 49 -> 25 leaves one of the 25 A tokens unmerged, chosen by
    # similarity, so no budget of 49 tokens is input-independent; 48 -> 24 would be (every A token merges)
    assert not run("tome", budget=12)["input_independent"]
    assert not run("tome", budget=13)["input_independent"]
    fastervlm = run("fastervlm", keep_ratio=0.25)
    assert not fastervlm["input_independent"]
    assert fastervlm["min_row_jaccard"] <= fastervlm["min_jaccard"] <= fastervlm["mean_jaccard"]


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"trials": 0}, "trials must be an int >= 1"),
        ({"trials": True}, "trials must be an int >= 1"),
        ({"trials": 2.0}, "trials must be an int >= 1"),
        ({"noise_std": -0.1}, "noise_std must be a finite number >= 0"),
        ({"noise_std": math.nan}, "noise_std must be a finite number >= 0"),
    ],
)
def test_bad_arguments_fail_early(tiny, arguments, match):
    model, proc = tiny("llava")
    with pytest.raises(UnsupportedInputError, match=match):
        kept_set_stability(model, batch_inputs("llava", proc, (1,)), "fastervlm", **arguments)
    assert not hasattr(model, "_tokprune_pruner")


def test_inputs_without_pixels_fail_early(tiny):
    model, proc = tiny("llava")
    with pytest.raises(UnsupportedInputError, match="neither pixel_values nor pixel_values_videos"):
        kept_set_stability(model, text_inputs(proc), "fastervlm")
    assert not hasattr(model, "_tokprune_pruner")


def test_video_only_inputs_perturb_the_video_pixels(tiny):
    """A Qwen2-VL prompt with one video clip and no image: the video pixels get the noise."""
    from test_method_mustdrop import _video_inputs

    model, proc = tiny("qwen2_vl")
    inputs = _video_inputs(proc)  # 2 frames of 4 x 4 tokens
    assert "pixel_values" not in inputs
    calm = kept_set_stability(model, inputs, "fastervlm", keep_ratio=0.25, noise_std=0.0, trials=1)
    assert calm["mean_jaccard"] == 1.0 and calm["visual_kept"] == [8]
    assert not calm["input_independent"]
    noisy = kept_set_stability(model, inputs, "fastervlm", keep_ratio=0.25, noise_std=3.0, trials=2)
    assert noisy["mean_jaccard"] < 1.0


def _tiny_llava_preset(monkeypatch):
    from tiny_models import tiny_llava

    from tokprune.bench import presets

    def build(layers, attn, dtype, device):
        model, proc = tiny_llava(attn)
        return model, lambda batch_size: batch_inputs("llava", proc, (1,) * batch_size)

    monkeypatch.setitem(presets.PRESETS, "tiny-llava", presets.Preset("tiny-llava", "test", build))


def test_cli_marks_fixed_and_inapplicable_methods(monkeypatch, capsys):
    """Every method by default: input-independent ones are marked, AnyRes-only ones are listed as n/a (the
    registry is cut to five methods here: vtc_cls's default layers need a deeper tower than the tiny one)."""
    import tokprune
    from tokprune import cli

    _tiny_llava_preset(monkeypatch)
    monkeypatch.setattr(
        tokprune, "available_methods", lambda: ["fastervlm", "globalcom2", "hired", "pool", "random"]
    )
    assert cli.main(["robustness", "--model", "tiny-llava", "--budget", "0.25", "--trials", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert "fixed by construction" in row["random"] and "fixed by construction" in row["pool"]
    assert "fixed by construction" not in row["fastervlm"]
    for method in ("hired", "globalcom2"):
        assert "n/a (needs AnyRes tiles; LlavaForConditionalGeneration has none)" in row[method]
    assert lines[-1].startswith("(positions only")


def test_cli_options_and_early_errors(monkeypatch, capsys):
    from tokprune import cli

    _tiny_llava_preset(monkeypatch)
    argv = ["robustness", "--model", "tiny-llava", "--methods", "fastv", "--budget", "0.25", "--trials", "1"]
    assert cli.main([*argv, "--option", "layer=1"]) == 0
    assert "fastv" in capsys.readouterr().out
    assert cli.main([*argv, "--option", "layers=1"]) == 2
    assert "fastv has no option layers" in capsys.readouterr().err
    # checked before the model loads: an unknown model would fail otherwise
    assert cli.main(["robustness", "--model", "no-such-model", "--trials", "0"]) == 2
    assert "trials must be an int >= 1" in capsys.readouterr().err
    assert cli.main(["robustness", "--model", "no-such-model", "--noise-std", "-1"]) == 2
    assert "noise_std must be" in capsys.readouterr().err
