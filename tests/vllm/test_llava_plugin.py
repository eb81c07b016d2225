"""tokprune's pre-LLM methods inside vLLM on LLaVA: keep-all is stock vLLM, each image enters the LLM as k
tokens, greedy runs equal tokprune's HF path in vLLM's position convention, and what cannot run is refused
when the model loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from contextlib import contextmanager

import pytest
from conftest import N_VISUAL, engine, greedy, hf_greedy, image_placeholders, toy_requests

import tokprune
import tokprune.api
from tokprune.errors import UnsupportedModelError
from tokprune.methods import REGISTRY
from tokprune.serving.vllm import llm, overrides, servable_methods

# the methods every local run covers (merging before the projector with an extra [CLS] token, diversity,
# [CLS] attention, token merging); CI runs every servable method (the slow marks)
QUICK = ("visionzip", "divprune", "fastervlm", "tome")
BUDGET = 16


def _budget_args(method: str) -> dict:
    return {"budget": BUDGET}


@contextmanager
def contiguous_reference(model, method: str, monkeypatch, **kwargs):
    """tokprune.apply(..., positions="contiguous"): vLLM's numbering. apply() allows it only as part of the
    reproduction mode, for methods whose released code runs on LLaVA; for the others (pool, random, ToMe)
    the same engine setting is reached with that check switched off."""
    if "llava" not in REGISTRY[method].code_families:
        monkeypatch.setattr(tokprune.api, "_check_reproduction", lambda *args: None)
    with tokprune.apply(model, method, positions="contiguous", **kwargs) as pruner:
        yield pruner


def _assert_same_run(plugin, reference, tol: float = 0.0):
    for (n_v, ids_v, lp_v), (n_r, ids_r, lp_r) in zip(plugin, reference, strict=True):
        assert n_v == n_r
        assert ids_v == ids_r
        assert lp_v == pytest.approx(lp_r, abs=tol, rel=0)


def test_keep_all_through_the_plugin_is_stock_vllm(toy_folder):
    """A budget of every token runs tokprune's code path (hooks, selection, per-image split) and must give
    vLLM's own greedy tokens and logprobs bit for bit."""
    requests = toy_requests()
    with engine(toy_folder) as stock:
        expected = greedy(stock, requests)
    with engine(toy_folder, hf_overrides=overrides(toy_folder, "fastervlm", budget=N_VISUAL)) as plugin:
        got = greedy(plugin, requests)
        placeholders = image_placeholders(plugin, requests)
    _assert_same_run(got, expected)
    assert placeholders == [N_VISUAL] * 3 + [2 * N_VISUAL]


def _methods():
    return [m if m in QUICK else pytest.param(m, marks=pytest.mark.slow) for m in servable_methods()]


@pytest.mark.parametrize("method", _methods())
def test_plugin_equals_the_hf_path_with_contiguous_positions(method, toy_folder, hf_toy, monkeypatch):
    """k placeholders per image (a batch of requests, different image sizes, one with two images), and the
    greedy tokens of vLLM + plugin equal tokprune.apply(..., positions="contiguous") on the same toy:
    vLLM numbers the k placeholders contiguously, as the original LLaVA code does."""
    requests = toy_requests()
    model, processor = hf_toy
    with contiguous_reference(model, method, monkeypatch, **_budget_args(method)):
        reference = hf_greedy(model, processor, requests)
    dropped = N_VISUAL - BUDGET
    reference = [(n - dropped * (2 if i == 3 else 1), ids, lp) for i, (n, ids, lp) in enumerate(reference)]
    with engine(toy_folder, hf_overrides=overrides(toy_folder, method, **_budget_args(method))) as plugin:
        got = greedy(plugin, requests)
        placeholders = image_placeholders(plugin, requests)
    assert placeholders == [BUDGET] * 3 + [2 * BUDGET]
    _assert_same_run(got, reference, tol=2e-3)  # vLLM's CPU kernels vs torch sdpa, float32


def test_selection_order_equals_the_hf_reproduction_mode(toy_folder, hf_toy):
    """order="selection": VisionZip's dominant tokens, then its contextual ones, as its released code hands
    them to the LLM, equal to tokprune.apply(order="selection", positions="contiguous")."""
    requests = toy_requests()
    model, processor = hf_toy
    with tokprune.apply(model, "visionzip", budget=BUDGET, order="selection", positions="contiguous"):
        reference = hf_greedy(model, processor, requests)
    dropped = N_VISUAL - BUDGET
    reference = [(n - dropped * (2 if i == 3 else 1), ids, lp) for i, (n, ids, lp) in enumerate(reference)]
    hf = overrides(toy_folder, "visionzip", budget=BUDGET, order="selection")
    with engine(toy_folder, hf_overrides=hf) as plugin:
        got = greedy(plugin, requests)
    _assert_same_run(got, reference, tol=2e-3)


def test_the_entry_point_loads_in_vllms_own_processes(toy_folder, hf_toy, tmp_path):
    """With vLLM's default multiprocessing the engine core is another process: the plugin must be registered
    there through the `vllm.general_plugins` entry point (a plain LLM(..., hf_overrides=...) call)."""
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        from conftest import ENGINE, greedy, toy_requests
        from vllm import LLM
        from tokprune.serving.vllm import overrides
        if __name__ == "__main__":
            llm = LLM(model={str(toy_folder)!r}, hf_overrides=overrides({str(toy_folder)!r}, "fastervlm",
                      budget={BUDGET}), **ENGINE)
            print("RESULT", json.dumps(greedy(llm, toy_requests()[:2])))
        """)
    )
    here = str(__import__("pathlib").Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=400,
        env={**__import__("os").environ, "PYTHONPATH": here},
    )  # fmt: skip
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, done.stderr[-3000:]
    got = [tuple(r) for r in __import__("json").loads(line[0][len("RESULT ") :])]
    model, processor = hf_toy
    with tokprune.apply(model, "fastervlm", budget=BUDGET, positions="contiguous"):
        reference = hf_greedy(model, processor, toy_requests()[:2])
    reference = [(n - (N_VISUAL - BUDGET), ids, lp) for n, ids, lp in reference]
    _assert_same_run(got, reference, tol=2e-3)


@pytest.mark.parametrize(
    "method, kwargs, match",
    [
        ("fastv", {}, "acts inside the language model"),
        ("cdpruner", {}, "prompt's text"),
        ("prumerge", {}, "adaptive"),
        ("nope", {}, "unknown method"),
        ("visionzip", {"options": {"bogus": 1}}, "no option bogus"),
        ("visionzip", {"order": "shuffled"}, "order must be one of"),
    ],
)
def test_the_helper_refuses_before_building_an_engine(method, kwargs, match, toy_folder):
    with pytest.raises(tokprune.errors.TokpruneError, match=match):
        llm(toy_folder, method, **kwargs)


def test_a_bad_entry_is_refused_when_the_model_loads(toy_folder):
    """A hand-written hf_overrides (what `vllm serve --hf-overrides` gets) with an in-LLM method fails when the
    model loads, with the reason, instead of serving an unpruned or wrongly sized model."""
    hf = {"architectures": ["TokpruneLlavaForConditionalGeneration"], "tokprune": {"method": "fastv"}}
    with (
        pytest.raises(Exception, match="acts inside the language model"),
        engine(toy_folder, hf_overrides=hf),
    ):  # noqa: B017
        pass


def test_an_architecture_without_the_entry_is_refused(toy_folder):
    hf = {"architectures": ["TokpruneLlavaForConditionalGeneration"]}
    with pytest.raises(Exception, match="has no 'tokprune' entry"), engine(toy_folder, hf_overrides=hf):  # noqa: B017
        pass


def test_servable_methods_are_the_fixed_count_pre_llm_ones():
    names = servable_methods()
    assert {"visionzip", "divprune", "fastervlm", "tome"} <= set(names)
    assert not {"fastv", "pdrop", "sparsevlm", "dart", "cdpruner", "hired", "globalcom2"} & set(names)
    with pytest.raises(UnsupportedModelError, match="does not support Qwen2VLForConditionalGeneration"):
        overrides(None, "visionzip", budget=8, architecture="Qwen2VLForConditionalGeneration")


def test_an_untested_vllm_release_is_refused_when_the_model_loads(monkeypatch):
    import vllm

    from tokprune.serving.vllm.runtime import check_runtime

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(tokprune.errors.ServingError, match="tested with vLLM 0.32"):
        check_runtime(None)


def test_a_tensor_parallel_vision_tower_is_refused_unless_it_runs_whole(monkeypatch):
    """Under tensor parallelism each rank would score with its own heads; mm_encoder_tp_mode="data" runs the
    tower whole on every rank, so it passes."""
    import vllm.distributed
    import vllm.model_executor.models.vision as vision

    from tokprune.serving.vllm.runtime import check_runtime

    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(vision, "is_vit_use_data_parallel", lambda: False)
    with pytest.raises(tokprune.errors.ServingError, match="mm_encoder_tp_mode='data'"):
        check_runtime(None)
    monkeypatch.setattr(vision, "is_vit_use_data_parallel", lambda: True)
    check_runtime(None)
