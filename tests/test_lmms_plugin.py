"""The lmms-eval plugin (`--model tokprune`) and the packaged `tokprune_toyvqa` tasks, offline on CPU.

An untrained toy VLM is enough: these tests check the pipeline (requests in, answers, losses, stats and
metrics out). That the answers are right is checked on the trained toy in test_lmms_trained_toy.py.
lmms-eval is an optional extra: without it these tests skip, except under `make test` (which installs it
and sets TOKPRUNE_REQUIRE_EVAL=1), where they fail.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("TOKPRUNE_REQUIRE_EVAL"):
    import lmms_eval  # noqa: F401
else:
    pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import GenerationResult, Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_eval.models.model_utils.gen_metrics import (  # noqa: E402
    get_logged_metrics_history,
    reset_logged_metrics,
    summarize_logged_metrics,
)
from lmms_eval.tasks import TaskManager  # noqa: E402

import tokprune  # noqa: E402
from tokprune.errors import BudgetError, MethodOptionError, UnknownMethodError  # noqa: E402
from tokprune.eval import task_dir  # noqa: E402
from tokprune.eval.args import ModelArgsError, option_value, parse_methods, run_args  # noqa: E402
from tokprune.eval.lmms import TokpruneChat, TokpruneSimple  # noqa: E402
from tokprune.eval.prompting import Turn, plain_prompt, render, turns_from_messages  # noqa: E402
from tokprune.eval.toyvqa import DATA, build_docs, doc_to_visual, normalize, process_results  # noqa: E402
from tokprune.toy.model import N_VISUAL, WEIGHTS, prompt, toy_config, toy_processor  # noqa: E402

TASK = "tokprune_toyvqa"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
KEEP = math.ceil(0.25 * N_VISUAL)  # 49 of 196


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    """An untrained toy VLM saved like the packaged weights (config, safetensors, processor files)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    processor = toy_processor()
    model = LlavaForConditionalGeneration(toy_config(processor))
    path = tmp_path_factory.mktemp("toy")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def toy(toy_dir):
    """(model, processor) of the untrained toy, loaded as the plugin loads a folder."""
    from tokprune.eval.loading import load_pretrained

    return load_pretrained(str(toy_dir), "auto", "sdpa")


@pytest.fixture(scope="module")
def task_manager() -> TaskManager:
    return TaskManager(include_path=str(task_dir()), include_defaults=False)


def docs(n: int) -> dict:
    """A task_dict entry as lmms-eval builds it: {split: docs}."""
    return {"test": build_docs(n)}


def request(kind: str, args: tuple, doc_id: int = 0) -> Instance:
    return Instance(
        request_type=kind, arguments=args, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1}
    )


def simple_lm(toy, **kwargs) -> TokpruneSimple:
    model, processor = toy
    lm = TokpruneSimple(model=model, processor=processor, **kwargs)
    lm.task_dict[TASK] = docs(4)
    return lm


# ----------------------------------------------------------------------------------------- arguments
def test_entry_point_registers_chat_and_simple_classes():
    assert get_model("tokprune") is TokpruneChat
    assert get_model("tokprune", force_simple=True) is TokpruneSimple


def test_option_values_are_parsed():
    assert option_value("[8,16,24]") == (8, 16, 24)
    assert option_value("(0.5, 0.25)") == (0.5, 0.25)
    assert option_value("none") is None and option_value("True") is True
    assert option_value("rank") == "rank" and option_value(3) == 3 and option_value("0.5") == 0.5
    assert parse_methods("visionzip+fastv") == ["visionzip", "fastv"]
    assert parse_methods("none") == [] and parse_methods(None) == []
    args = run_args(
        pretrained="toy", method="fastv", budget="64", layer=3, batch_size="auto", max_new_tokens="4"
    )
    assert (args.prune.budget, args.prune.options, args.batch_size, args.max_new_tokens) == (
        64,
        {"layer": 3},
        1,
        4,
    )


def test_model_args_string_with_cli_defaults(toy_dir):
    """model_args win over the CLI's --batch_size (lmms-eval would otherwise pass both and fail)."""
    lm = TokpruneSimple.create_from_arg_string(
        f"pretrained={toy_dir},method=random,keep_ratio=0.5,seed=3,batch_size=3,dtype=float32",
        {"batch_size": "1", "max_batch_size": None, "device": "cpu"},
    )
    assert (
        lm.batch_size == 3
        and lm.run_args.prune.options == {"seed": 3}
        and lm.run_args.prune.keep_ratio == 0.5
    )
    assert lm.session.device.type == "cpu"
    with lm.session.pruning() as pruner:
        assert pruner.methods[0].seed == 3
    assert not hasattr(lm.session.model, "_tokprune_pruner")  # only patched while requests run


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "nope"}, UnknownMethodError, "available methods: .*divprune"),
        (
            {"method": "divprune", "foo": 1},
            MethodOptionError,
            "foo: neither a model argument .* nor an option of divprune",
        ),
        ({"method": "divprune", "device_mapp": "cpu"}, ModelArgsError, "device_mapp: neither"),
        ({"method": "divprune", "budget": 8, "keep_ratio": 0.5}, BudgetError, "not both"),
        ({"method": "divprune", "keep_ratio": 1.5}, BudgetError, "keep_ratio must be in"),
        ({"keep_ratio": 0.5}, ModelArgsError, "without a method"),
        ({"method": "divprune", "dtype": "float8"}, ModelArgsError, "dtype must be one of"),
        ({"method": "divprune", "batch_size": 0}, ModelArgsError, "batch_size must be a positive integer"),
        ({"pretrained": "x"}, ModelArgsError, "not both"),
    ],
)
def test_bad_arguments_fail_early(toy, kwargs, error, match):
    model, processor = toy
    with pytest.raises(error, match=match):
        TokpruneSimple(model=model, processor=processor, **kwargs)
    assert not hasattr(model, "_tokprune_pruner")


def test_model_needs_processor_and_pretrained_toy(toy):
    with pytest.raises(ModelArgsError, match="processor"):
        TokpruneSimple(model=toy[0])
    with pytest.raises(ModelArgsError, match="pretrained="):
        TokpruneSimple(method="divprune")
    assert (WEIGHTS / "model.safetensors").exists(), "the trained toy weights must ship in the package"
    assert TokpruneSimple("toy", method="divprune").session.model.config.image_seq_length == N_VISUAL


def test_a_built_model_gets_the_dtype_and_attention_given():
    """dtype / attn_implementation apply to a model passed in (in place, as device does); left out, the
    model keeps its own; a backend the model refuses is a ModelArgsError."""
    from transformers import LlavaForConditionalGeneration

    processor = toy_processor()
    model = LlavaForConditionalGeneration(toy_config(processor)).eval()
    kept = TokpruneSimple(model=model, processor=processor, method="divprune", keep_ratio=0.25)
    assert kept.session.model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    lm = TokpruneSimple(model=model, processor=processor, method="divprune", keep_ratio=0.25,
                        dtype="bfloat16", attn_implementation="eager")  # fmt: skip
    assert lm.session.model is model and model.dtype == torch.bfloat16
    configs = (model.config, model.config.text_config, model.config.vision_config)
    assert [c._attn_implementation for c in configs] == ["eager"] * 3
    lm.task_dict[TASK] = docs(1)
    (answer,) = lm.generate_until([generate_request(0)])  # bf16 pixels from the session, eager attention
    assert isinstance(answer.text, str) and answer.token_counts.input_tokens > KEEP
    with pytest.raises(ModelArgsError, match="attn_implementation=nonsense cannot be used"):
        TokpruneSimple(model=model, processor=processor, attn_implementation="nonsense")


# ----------------------------------------------------------------------------------------- prompts
def test_toy_prompt_format_without_chat_template(toy):
    """The toy tokenizer has no chat template: simple and chat requests get the toy's training prompt."""
    processor, question, image = toy[1], "what color is the square ?", object()
    assert render(processor, [Turn("user", question, [image])]) == (prompt(question), [image])
    message = {
        "role": "user",
        "content": [{"type": "image", "url": image}, {"type": "text", "text": question}],
    }
    with pytest.raises(TypeError, match="images only"):
        turns_from_messages([message])  # object() is no image
    image = doc_to_visual(build_docs(1)[0])[0]
    message["content"][0]["url"] = image
    assert render(processor, turns_from_messages([message]))[0] == prompt(question)
    assert plain_prompt([Turn("user", f"<image> {question}", [image])], "<image>") == prompt(question)


# ----------------------------------------------------------------------------------------- task
def test_task_docs_are_the_held_out_questions():
    import json

    from tokprune.toy.task import generate
    from tokprune.toy.train import HELD_OUT_SEED

    shipped = json.loads(DATA.read_text())
    samples = generate(len(shipped), HELD_OUT_SEED)
    assert len(shipped) == 500 and DATA.stat().st_size < 3e6
    assert [(d["index"], d["question"], d["answer"], d["kind"]) for d in shipped] == [
        (i, s.question, s.answer, s.kind) for i, s in enumerate(samples)
    ]
    image = doc_to_visual(shipped[7])[0]
    assert (
        image.size == (112, 112)
        and (torch.tensor(list(image.getdata())).view(112, 112, 3).numpy() == samples[7].image).all()
    )
    with pytest.raises(ValueError, match="rebuild"):
        doc_to_visual({**shipped[7], "question": "how many red objects ?"})


def test_exact_match_normalises_the_first_word():
    doc = {"answer": "green"}
    assert normalize("Green.") == "green" and normalize("  ") == ""
    assert process_results(doc, ["Green, the square"]) == {"exact_match": 1.0}
    assert process_results(doc, ["red"]) == {"exact_match": 0.0}
    assert process_results(doc, [""]) == {"exact_match": 0.0}


def test_task_is_found_by_include_path(task_manager):
    assert {"tokprune_toyvqa", "tokprune_toyvqa_mc"} <= set(task_manager.all_tasks)


# ----------------------------------------------------------------------------------------- requests
def generate_request(doc_id: int, max_new_tokens: int = 2) -> Instance:
    doc = build_docs(doc_id + 1)[doc_id]
    gen = {"max_new_tokens": max_new_tokens, "temperature": 0, "until": ["\n"]}
    return request("generate_until", (doc["question"], gen, doc_to_visual, doc_id, TASK, "test"), doc_id)


def test_generate_until_logs_pruning_stats(toy):
    reset_logged_metrics()
    results = simple_lm(toy, method="divprune", keep_ratio=0.25, batch_size=2).generate_until(
        [generate_request(i) for i in range(3)]
    )
    assert all(isinstance(r, GenerationResult) and isinstance(r.text, str) for r in results)
    assert all(r.token_counts.output_tokens == 2 and r.token_counts.input_tokens > KEEP for r in results)
    pruned = summarize_logged_metrics()
    assert pruned["avg_visual_tokens_in"] == N_VISUAL and pruned["avg_visual_tokens_kept"] == KEEP
    assert pruned["avg_batch_ttft_s"] > 0 and pruned["total_gen_tokens"] == 6 and pruned["avg_latency"] > 0

    reset_logged_metrics()
    simple_lm(toy).generate_until([generate_request(i) for i in range(3)])
    full = summarize_logged_metrics()
    assert full["avg_visual_tokens_kept"] == N_VISUAL
    assert full["avg_llm_input_tokens"] - pruned["avg_llm_input_tokens"] == N_VISUAL - KEEP
    assert pruned["avg_prefill_flops"] < full["avg_prefill_flops"] and full["avg_scoring_flops"] == 0


def test_throughput_keys_say_what_they_measure_with_batches(toy):
    """batch_size=3 over 4 requests (batches of 3 and 1): every request logs its batch's time to first
    token and scoring time and its latency (its batch's wall time, HF generate() returns the rows
    together), scoring <= ttft <= latency; wall_share_s splits the wall time so it sums to the run's."""
    reset_logged_metrics()
    lm = simple_lm(toy, method="divprune", keep_ratio=0.25, batch_size=3)
    lm.generate_until([generate_request(i) for i in range(4)])
    entries = get_logged_metrics_history()
    assert len(entries) == 4 and all(e["total_requests"] == 1 for e in entries)
    for entry in entries:
        assert 0 < entry["batch_scoring_s"] <= entry["batch_ttft_s"] <= entry["total_elapsed_time"]
    batch, alone = entries[:3], entries[3]
    assert len({(e["batch_ttft_s"], e["total_elapsed_time"], e["batch_scoring_s"]) for e in batch}) == 1
    assert batch[0]["wall_share_s"] == pytest.approx(batch[0]["total_elapsed_time"] / 3)
    assert alone["wall_share_s"] == alone["total_elapsed_time"]
    summary = summarize_logged_metrics()
    assert "avg_ttft_s" not in summary and "avg_scoring_s" not in summary
    assert summary["avg_batch_scoring_s"] <= summary["avg_batch_ttft_s"] <= summary["avg_latency"]
    assert summary["avg_latency"] == pytest.approx(
        (3 * batch[0]["total_elapsed_time"] + alone["total_elapsed_time"]) / 4
    )
    wall = batch[0]["total_elapsed_time"] + alone["total_elapsed_time"]  # the two generate() calls
    assert summary["avg_wall_share_s"] * 4 == pytest.approx(wall)

    reset_logged_metrics()
    doc = build_docs(1)[0]
    lm.loglikelihood([request("loglikelihood", (doc["question"], " red", doc_to_visual, 0, TASK, "test"))])
    (scored,) = get_logged_metrics_history()
    assert scored["batch_scoring_s"] <= scored["batch_ttft_s"] <= scored["total_elapsed_time"]


def test_batching_does_not_change_greedy_answers(toy):
    requests = [generate_request(i, max_new_tokens=3) for i in range(3)]
    one = simple_lm(toy, method="divprune", keep_ratio=0.25).generate_until(requests)
    batched = simple_lm(toy, method="divprune", keep_ratio=0.25, batch_size=3).generate_until(requests)
    assert [r.text for r in one] == [r.text for r in batched]


def test_loglikelihood_returns_a_loss_consistent_with_generation(toy):
    """The pruned model's own greedy continuation scores as greedy, with the loss of its logits."""
    model, processor = toy
    doc = build_docs(1)[0]
    inputs = processor(text=[prompt(doc["question"])], images=doc_to_visual(doc), return_tensors="pt")
    with tokprune.apply(model, "divprune", keep_ratio=0.25), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
    ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    # the generated tokens as text (an untrained toy may emit special tokens; they tokenize back to themselves)
    greedy = " ".join(processor.tokenizer.convert_ids_to_tokens(ids))
    assert processor.tokenizer(f" {greedy}", add_special_tokens=False).input_ids == ids
    lm = simple_lm(toy, method="divprune", keep_ratio=0.25)
    args = (doc["question"], f" {greedy}", doc_to_visual, 0, TASK, "test")
    other_word = "zebra" if ids[0] != processor.tokenizer.convert_tokens_to_ids("zebra") else "red"
    other = (doc["question"], f" {other_word}", doc_to_visual, 0, TASK, "test")
    scored, wrong = lm.loglikelihood([request("loglikelihood", args), request("loglikelihood", other)])
    assert isinstance(scored, GenerationResult) and isinstance(scored.text, tuple)
    loss, is_greedy = scored.text
    assert isinstance(loss, float) and loss > 0 and is_greedy is True and wrong.text[1] is False
    assert scored.token_counts.input_tokens < N_VISUAL  # the prompt was pruned before the continuation
    # the same loss by hand: pruned prefill, then the continuation's tokens one decode step at a time
    logprobs = [torch.log_softmax(step[0].float(), -1)[t] for step, t in zip(out.logits, ids)]
    assert loss == pytest.approx(-float(sum(logprobs)), rel=1e-4)


def test_multi_round_generation(toy):
    lm = simple_lm(toy, method="divprune", keep_ratio=0.25, max_new_tokens=1)
    doc = build_docs(1)[0]

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        return doc_to_visual(doc), doc["question"], round_idx >= 3, previous_output, {"round": round_idx}

    result = lm.generate_until_multi_round(
        [
            request(
                "generate_until_multi_round",
                (doc["question"], {}, doc_to_visual, doc_to_text, 0, TASK, "test"),
            )
        ]
    )[0]
    assert isinstance(result.text, list) and len(result.text) == 3 and result.token_counts.output_tokens == 3

    def doc_to_messages(doc, round_idx=None, previous_output=None, previous_round_info=None):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "url": doc_to_visual(doc)[0]},
                    {"type": "text", "text": doc["question"]},
                ],
            }
        ]
        return messages if round_idx is None else (messages, round_idx >= 2, previous_output, None)

    chat = TokpruneChat(model=toy[0], processor=toy[1], method="divprune", keep_ratio=0.25, max_new_tokens=1)
    chat.task_dict[TASK] = docs(1)
    rounds = chat.generate_until_multi_round(
        [request("generate_until_multi_round", ("", doc_to_messages, {}, 0, TASK, "test"))]
    )
    assert len(rounds[0].text) == 2 and rounds[0].text[0] == result.text[0]


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE])
def test_qwen_with_and_without_a_chat_template(tiny, template):
    """A Qwen2.5-VL (tiny, random): the processor's chat template when it has one, else the plain format."""
    model, processor = tiny("qwen2_5_vl")
    processor = copy.copy(processor)
    processor.chat_template = template
    lm = TokpruneSimple(model=model, processor=processor, method="divprune", keep_ratio=0.5, batch_size=2)
    lm.task_dict[TASK] = docs(2)
    text, _ = render(processor, [Turn("user", "what ?", [object()])])
    expected = "user: <|vision_start|><|image_pad|><|vision_end|>what ? assistant:"
    assert text == (
        expected if template else "USER: <|vision_start|><|image_pad|><|vision_end|> what ? ASSISTANT:"
    )
    reset_logged_metrics()
    results = lm.generate_until([generate_request(0), generate_request(1)])
    logged = summarize_logged_metrics()
    assert len(results) == 2 and logged["avg_visual_tokens_in"] == 16  # 112 px: 8x8 patches, 2x2 merged
    assert logged["avg_visual_tokens_kept"] == 8 and logged["avg_prefill_flops"] > 0


# ----------------------------------------------------------------------------------------- end to end
def check_results(results: dict, n: int, kept: int) -> None:
    assert 0 <= results["results"][TASK]["exact_match,none"] <= 1
    assert results["throughput"]["avg_visual_tokens_in"] == N_VISUAL
    assert results["throughput"]["avg_visual_tokens_kept"] == kept
    assert results["throughput"]["avg_batch_ttft_s"] > 0 and results["throughput"]["avg_prefill_flops"] > 0
    assert results["throughput"]["avg_batch_ttft_s"] <= results["throughput"]["avg_latency"]
    efficiency = results["efficiency"]["by_task"][TASK]
    assert efficiency["docs"] == n and efficiency["docs_with_token_counts"] == n
    assert efficiency["total_output_tokens"] > 0 and efficiency["total_input_tokens"] > n * kept


@pytest.mark.slow
def test_simple_evaluate_with_a_built_model(toy, task_manager):
    model, processor = toy
    for cls in (TokpruneSimple, TokpruneChat):
        lm = cls(model=model, processor=processor, method="divprune", keep_ratio=0.25, max_new_tokens=2)
        results = simple_evaluate(
            model=lm, tasks=[TASK], task_manager=task_manager, limit=3, bootstrap_iters=0
        )
        check_results(results, 3, KEEP)
        assert (
            f"{cls.__name__} ({'simple' if lm.is_simple else 'chat'})" in results["config"]["model_backend"]
        )
        assert not hasattr(model, "_tokprune_pruner") and lm.session is not None  # left usable, unpatched


@pytest.mark.slow
def test_simple_evaluate_with_the_registered_model_id(toy_dir, task_manager):
    model_args = f"pretrained={toy_dir},method=divprune,keep_ratio=0.25,max_new_tokens=2"
    results = simple_evaluate(model="tokprune", model_args=model_args, tasks=[TASK], task_manager=task_manager,
                              limit=3, bootstrap_iters=0, batch_size=1)  # fmt: skip
    check_results(results, 3, KEEP)
    assert "TokpruneChat (chat)" in results["config"]["model_backend"]

    choice = simple_evaluate(model="tokprune", model_args=f"pretrained={toy_dir}", tasks=["tokprune_toyvqa_mc"],
                             task_manager=task_manager, limit=2, bootstrap_iters=0, force_simple=True)  # fmt: skip
    assert choice["results"]["tokprune_toyvqa_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert choice["throughput"]["avg_visual_tokens_kept"] == N_VISUAL


def lmms_eval_cli(*args: str) -> subprocess.CompletedProcess:
    """The installed `lmms-eval` command, offline, without --include_path."""
    cli = Path(sys.executable).with_name("lmms-eval")
    env = {**os.environ, **OFFLINE}
    return subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_cli_end_to_end(toy_dir):
    """The documented command line: the task is found without --include_path, the loading keys of
    lmms-eval's HF models work; DEBUG makes the CLI fail on evaluation errors instead of exiting 0."""
    model_args = f"pretrained={toy_dir},device_map=cpu,torch_dtype=float32,method=divprune,keep_ratio=0.25"
    done = lmms_eval_cli("--model", "tokprune", "--model_args", model_args, "--tasks", TASK, "--limit", "2",
                         "--verbosity", "DEBUG")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "|tokprune_toyvqa|" in done.stdout and "avg_visual_tokens_kept" in done.stdout
    assert f"avg_visual_tokens_kept     |{KEEP:>14.4f}" in done.stdout


@pytest.mark.slow
def test_cli_fails_on_bad_model_args():
    """A model argument that is neither a loading key nor a method option fails the run (status 1, the
    message on stderr), without --verbosity DEBUG."""
    model_args = "pretrained=toy,method=visionzip,budget=16,device_mapp=cpu"
    done = lmms_eval_cli("--model", "tokprune", "--model_args", model_args, "--tasks", TASK, "--limit", "1")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "device_mapp: neither a model argument of tokprune" in done.stderr
    assert "nor an option of visionzip" in done.stderr and "Metric" not in done.stdout


@pytest.mark.slow
def test_lmms_eval_models_lists_tokprune():
    done = lmms_eval_cli("models")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert ["tokprune", "chat+simple"] in rows
