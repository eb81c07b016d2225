"""The measuring harness end to end on a tiny model, the outputs it writes, and the CLI's errors."""

import json

import pytest
import torch
from tiny_models import batch_inputs
from transformers.utils import is_flash_attn_2_available

from tokprune import cli
from tokprune.bench.harness import Setting, applied, attention_backends, run_benchmark
from tokprune.bench.measure import PeakMemory, kv_cache_bytes, return_freed_memory_to_os
from tokprune.bench.report import target_checks, write_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PER_SETTING = [
    "prefill_s_median", "prefill_s_min", "prefill_s_max", "e2e_s_median", "decode_tokens_per_s_median",
    "peak_prefill_bytes_median", "peak_e2e_bytes_median", "kv_cache_bytes_median", "scoring_s_median",
    "visual_tokens_in", "visual_tokens_into_llm", "visual_tokens_final", "visual_tokens_layer_averaged",
    "flops_prefill", "flops_breakdown", "flops_decode_step", "prefill_speedup", "flops_predicted_speedup",
    "realised_over_predicted", "scoring_share_of_prefill",
]  # fmt: skip


def test_one_new_token_reports_no_decode_speed(tiny):
    """max_new_tokens=1 has no decode step: no decode figure (the table prints "—"), never 0 tok/s."""
    from tokprune.bench.report import markdown_table

    model, proc = tiny("llava")
    inputs = batch_inputs("llava", proc, (1,))
    rows = run_benchmark(model, inputs, [Setting()], max_new_tokens=1, repeats=1, warmup=0, progress=False)
    assert "decode_tokens_per_s_median" not in rows[0] and rows[0]["e2e_s_median"] > 0
    cells = markdown_table(rows).splitlines()[2].split(" | ")
    assert cells[7] == "—"  # the decode tok/s column


@pytest.mark.slow
def test_harness_end_to_end(tiny, tmp_path):
    model, proc = tiny("llava")
    inputs = batch_inputs("llava", proc, (1, 1))
    settings = [Setting(), Setting("divprune", budget=8), Setting("pdrop", keep_ratio=0.25),
                Setting("fastv", keep_ratio=0.25), Setting("fastv", keep_ratio=0.25, scoring="eager")]  # fmt: skip
    rows = run_benchmark(model, inputs, settings, max_new_tokens=3, repeats=2, warmup=1, progress=False)
    assert [r["setting"] for r in rows] == [s.label for s in settings]
    for row in rows:
        for key in PER_SETTING:
            assert key in row, key
        assert row["decode_tokens_per_s_median"] > 0  # timed inside generate(), after its prefill
    base, divprune, pdrop, _, _ = rows
    assert base["visual_tokens_into_llm"] == 49 and base["prefill_speedup"] == 1.0
    assert divprune["visual_tokens_into_llm"] == 8 and divprune["visual_tokens_layer_averaged"] == 8
    assert pdrop["visual_tokens_into_llm"] == 49
    assert pdrop["visual_tokens_layer_averaged"] == pytest.approx(
        (49 + 31 + 20 + 13) / 4
    )  # geometric stages of 0.25
    assert divprune["flops_prefill"] < base["flops_prefill"]
    assert divprune["kv_cache_bytes_median"] < base["kv_cache_bytes_median"]
    assert divprune["scoring_s_median"] > 0 and base["scoring_s_median"] == 0
    # the eager setting ran the whole model in eager attention, then restored both backends
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"

    paths = write_results(rows, {"model": "tiny"}, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["meta"] == {"model": "tiny"} and len(data["results"]) == 5
    assert paths["csv"].read_text().count("\n") == 6
    assert "| divprune@8 |" in paths["markdown"].read_text()
    checks = target_checks(rows)
    assert any("divprune@8: realised/predicted" in line for line in checks)
    assert any("fastv@0.25: in-place vs eager" in line for line in checks)
    assert all(line.startswith(("PASS", "MISS")) for line in checks)
    for key in ("prefill_speedup", "flops_prefill"):
        png = paths[key].read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1000


def test_kv_cache_bytes_and_peak_memory():
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), layer_idx=0)
    assert kv_cache_bytes(cache) == 2 * 40 * 4
    return_freed_memory_to_os()
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64, 1024, 1024)  # 256 MiB
        del block
    assert memory.peak_bytes > 200 * 2**20


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--model", "no-such-preset"], "unknown model"),
        (["bench", "--model", "llava-1.5-7b", "--methods", "nope", "--budgets", "64"], "unknown method"),
        (["bench", "--model", "llava-1.5-7b", "--methods", "fastv"], "--budgets"),
        (["bench", "--model", "llava-1.5-7b", "--methods", "fastv", "--budgets", "6x4"], "budget"),
        (["bench", "--model", "llava-1.5-7b", "--methods", "fastv", "--budgets", "64", "--option", "depth=2"],
         "no option depth"),
        (["bench", "--model", "llava-1.5-7b", "--repeats", "0"], "--repeats"),
        (["bench", "--model", "llava-1.5-7b", "--methods", "fastv", "--budgets", "64", "--device", "gpu"],
         "--device 'gpu'"),
        (["bench", "--model", "/no/such/folder", "--methods", "fastv", "--budgets", "64"], "unknown model"),
    ]
    + ([] if torch.cuda.is_available() else [
        (["bench", "--model", "llava-1.5-7b", "--methods", "fastv", "--budgets", "64", "--device", "cuda"],
         "no usable CUDA device"),
    ]),
)  # fmt: skip
def test_cli_errors_are_messages(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(is_flash_attn_2_available(), reason="flash-attn is installed here")
@pytest.mark.parametrize("command", ["demo", "robustness"])
def test_cli_unusable_attention_backend_is_a_message(command, capsys):
    """flash-attn is not installed on this machine: transformers refuses the backend when loading."""
    argv = [command, "--attn", "flash_attention_2", "--methods", "divprune"]
    assert cli.main(argv + (["--model", "toy"] if command == "robustness" else [])) == 2
    err = capsys.readouterr().err
    assert "--attn flash_attention_2 cannot be used here" in err and "Traceback" not in err


def test_cli_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--model", "llava-1.5-7b", "--wat"])
    assert info.value.code == 2
    assert "unrecognized arguments: --wat" in capsys.readouterr().err


def test_cli_budgets_parse():
    assert cli.parse_budget("64") == {"budget": 64}
    assert cli.parse_budget("0.25") == {"keep_ratio": 0.25}
    assert cli.parse_budget("33.3%") == {"keep_ratio": pytest.approx(0.333)}
    assert cli.parse_option("layers=(1,2,3)") == ("layers", (1, 2, 3))


def test_cli_methods_and_models_list(capsys):
    import tokprune

    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in tokprune.available_methods())
    # each method's line: name, family, where it acts, default budget, paper; then its options' defaults
    lines = out.splitlines()
    sparsevlm = next(i for i, line in enumerate(lines) if line.startswith("sparsevlm "))
    assert lines[sparsevlm].split()[:3] == ["sparsevlm", "text-guided,", "progressive"]
    assert "in LLM" in lines[sparsevlm] and "keep_ratio=0.190972" in lines[sparsevlm]
    assert "ICML 2025" in lines[sparsevlm]
    assert "raters='embeddings'" in lines[sparsevlm + 1] and "recycle='code'" in lines[sparsevlm + 1]
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "llava-1.5-7b" in out and "qwen2.5-vl-7b" in out and "LlavaForConditionalGeneration" in out


def test_cli_listing_into_a_closed_pipe_stops_quietly():
    """`tokprune methods | head -1`: no BrokenPipeError traceback, the shell's exit code for SIGPIPE."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already left: every write of the listing fails with EPIPE
    code = "import sys; from tokprune import cli; sys.exit(cli.main(['methods']))"
    child = subprocess.run(
        [sys.executable, "-c", code], stdout=write_end, stderr=subprocess.PIPE, timeout=120
    )
    os.close(write_end)
    stderr = child.stderr.decode()
    assert child.returncode == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


@pytest.mark.slow
def test_cli_bench_on_a_preset(tmp_path, monkeypatch, capsys):
    """The full command on a registered preset (a tiny builder stands in for the 7B shapes)."""
    from tiny_models import tiny_qwen25vl

    from tokprune.bench import presets

    def build(layers, attn, dtype, device):
        model, proc = tiny_qwen25vl(attn)
        return model, lambda batch_size: batch_inputs("qwen2_5_vl", proc, (1,) * batch_size)

    monkeypatch.setitem(presets.PRESETS, "tiny-qwen", presets.Preset("tiny-qwen", "test", build))
    argv = ["bench", "--model", "tiny-qwen", "--methods", "fastv,visionzip", "--budgets", "33.3%", "11.1%",
            "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2", "--eager-baseline", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| baseline |" in out and "fastv@0.333 [eager+output_attentions]" in out
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(rows) == 1 + 2 * 2 + 2  # baseline, 2 methods x 2 budgets, eager fastv x 2 budgets


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "llava_next", "gemma3"])
def test_cli_bench_on_a_saved_model(family, tmp_path, capsys):
    """`--model <folder>`: real weights loaded with the Auto classes, the prompt from the processor's chat
    template (images nested per prompt), FLOPs and visual-token accounting for the family."""
    from tiny_models import BUILDERS, IMAGE_PLACEHOLDER

    model, proc = BUILDERS[family]("sdpa")
    image = IMAGE_PLACEHOLDER.get(family, "<image>")
    proc.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        + image
        + " {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}ASSISTANT:"
    )
    model.save_pretrained(tmp_path / "model")
    proc.save_pretrained(tmp_path / "model")
    argv = ["bench", "--model", str(tmp_path / "model"), "--methods", "divprune", "--budgets", "0.5",
            "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2", "--no-progress",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    baseline, pruned = rows
    assert baseline["visual_tokens_in"] > 0 and baseline["flops_prefill"] > pruned["flops_prefill"] > 0
    assert pruned["visual_tokens_into_llm"] < baseline["visual_tokens_into_llm"]


def test_eager_baseline_switches_the_whole_model(tiny):
    """The reference codes' way: vision tower and LLM in eager attention while the setting runs."""
    model, _ = tiny("qwen2_5_vl")
    with applied(model, Setting("fastv", keep_ratio=0.25, scoring="eager")) as pruner:
        assert pruner is not None
        assert attention_backends(model) == {"vision_config": "eager", "text_config": "eager"}
        assert model.model.visual.config._attn_implementation == "eager"
    assert attention_backends(model) == {"vision_config": "sdpa", "text_config": "sdpa"}
