"""The kept-set stability diagnostic."""

import torch
from tiny_models import batch_inputs

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
