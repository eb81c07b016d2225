"""The lmms-eval plugin on the *trained* toy answers every question as the demo does.

The reference is `tokprune demo`'s own answerer (`tokprune.toy.demo.ToyAnswerer`: one batched prefill,
argmax of the next-token logits after "ASSISTANT:"), on the same held-out questions. Through lmms-eval
(`simple_evaluate(model="tokprune", model_args="pretrained=toy,...")`), unpruned and pruned by divprune at
keep 1/4:

* the generation task (`tokprune_toyvqa`, chat class) returns the reference's word for every doc, and
  its per-doc exact match is the reference's correctness;
* the multiple-choice task (`tokprune_toyvqa_mc`, simple class) scores every choice with the loss the
  reference's logits give it (-log softmax at the choice's token), flags the greedy choice, and its
  per-doc accuracy is that of the lowest-loss choice.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

if os.environ.get("TOKPRUNE_REQUIRE_EVAL"):  # `make test` installs the eval extra: fail, never skip, there
    import lmms_eval  # noqa: F401
else:
    pytest.importorskip("lmms_eval")

from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

import tokprune  # noqa: E402
from tokprune.eval import task_dir  # noqa: E402
from tokprune.eval.toyvqa import doc_to_choice  # noqa: E402
from tokprune.toy.demo import ToyAnswerer  # noqa: E402
from tokprune.toy.model import load_toy  # noqa: E402
from tokprune.toy.task import generate  # noqa: E402
from tokprune.toy.train import HELD_OUT_SEED  # noqa: E402

GENERATE, CHOICE = "tokprune_toyvqa", "tokprune_toyvqa_mc"
N_DOCS = 12  # four questions of each kind (the kinds rotate)
SETTINGS = {"unpruned": "", "divprune": ",method=divprune,keep_ratio=0.25"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def task_manager() -> TaskManager:
    return TaskManager(include_path=str(task_dir()), include_defaults=False)


@pytest.fixture(scope="module")
def reference():
    """(samples, tokenizer, {setting: (N, V) log-probabilities of the demo answerer's next token},
    {setting: the demo answerer's words})."""
    model, processor = load_toy()
    answerer = ToyAnswerer(model, processor)
    samples = generate(N_DOCS, HELD_OUT_SEED)
    inputs = answerer.inputs(samples)
    logprobs, words = {}, {}
    for setting in SETTINGS:
        pruning = (
            tokprune.apply(model, "divprune", keep_ratio=0.25)
            if setting == "divprune"
            else contextlib.nullcontext()
        )
        with pruning, torch.no_grad():
            logprobs[setting] = torch.log_softmax(answerer.logits(inputs), dim=-1)
            words[setting] = answerer.answer(inputs)[0]
    # pruning changes the scores, so the pruned comparison tells the settings apart
    assert not torch.allclose(logprobs["unpruned"], logprobs["divprune"], atol=1e-2)
    return samples, processor.tokenizer, logprobs, words


def evaluate(task: str, setting: str, task_manager: TaskManager, **kwargs) -> list[dict]:
    """The plugin's logged samples of `task` on the first N_DOCS docs, in doc order (and the results)."""
    results = simple_evaluate(
        model="tokprune", model_args=f"pretrained=toy{SETTINGS[setting]}", tasks=[task],
        task_manager=task_manager, limit=N_DOCS, bootstrap_iters=0, log_samples=True, **kwargs,
    )  # fmt: skip
    return sorted(results["samples"][task], key=lambda s: s["doc_id"]), results


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_generation_answers_equal_the_demo_answerer(setting, reference, task_manager):
    samples, tokenizer, logprobs, words = reference
    logged, results = evaluate(GENERATE, setting, task_manager)
    assert [s["doc_id"] for s in logged] == list(range(N_DOCS))
    assert words[setting] == tokenizer.convert_ids_to_tokens(logprobs[setting].argmax(-1).tolist())
    assert [s["filtered_resps"][0] for s in logged] == words[setting]
    correct = [float(word == sample.answer) for word, sample in zip(words[setting], samples)]
    assert [s["exact_match"] for s in logged] == correct
    assert results["results"][GENERATE]["exact_match,none"] == pytest.approx(sum(correct) / N_DOCS)
    assert sum(correct) >= N_DOCS - 2  # the trained toy: ~92% held-out accuracy
    # the task asks for one new token per answer (the toy never ends a line)
    assert results["efficiency"]["by_task"][GENERATE]["total_output_tokens"] == N_DOCS


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_multiple_choice_scores_equal_the_demo_answerer(setting, reference, task_manager):
    samples, tokenizer, logprobs, _ = reference
    logged, _ = evaluate(CHOICE, setting, task_manager, force_simple=True)
    assert [s["doc_id"] for s in logged] == list(range(N_DOCS))
    for entry, sample, row in zip(logged, samples, logprobs[setting]):
        choices = doc_to_choice(entry["doc"])
        ids = tokenizer.convert_tokens_to_ids(choices)
        losses = [float(loss) for loss, _ in entry["filtered_resps"]]
        assert losses == pytest.approx((-row[ids]).tolist(), rel=1e-3, abs=1e-4), entry["doc"]
        assert [greedy for _, greedy in entry["filtered_resps"]] == [i == int(row.argmax()) for i in ids]
        best = choices[int(torch.argmax(row[ids]))]
        assert entry["acc"] == float(best == sample.answer), entry["doc"]
