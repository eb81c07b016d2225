"""One patched model serving several conversations: each conversation (its own cache object) continues its
own prefill, whatever ran on the model in between, and threads sharing the model each get what they would
get alone (calls are serialised).

The reference of every conversation is the same patched model running that conversation alone, start to
end, in the same hand-written loop (prefill, then greedy decode steps that pass no position ids, so the
engine's numbering is exercised too).
"""

import copy
import threading

import pytest
import torch
from test_invariants import TINY_OPTIONS, _special_ids
from tiny_models import BUILDERS, batch_images, process, prompt_text

import tokprune
from tokprune.core.compat import CACHE_KWARG, output_cache
from tokprune.errors import MethodOptionError

STEPS = 3
METHODS = ["divprune", "visionzip", "fastv", "pdrop", "dart", "sparsevlm", "mustdrop"]
FAMILIES = list(BUILDERS)


def _prompt(family: str, proc, seed: int, words: str) -> dict:
    """A one-row prompt with one image (seeded), the text differing between conversations."""
    images = batch_images(family, (1,), seed=seed)
    return process(family, proc, [prompt_text(family, 1, words)], images)


class Chat:
    """One conversation driven step by step: `prefill()`, then `step()` greedy decode steps; `logits`
    collects the last-position logits of every forward."""

    def __init__(self, model, inputs: dict) -> None:
        self.model, self.inputs = model, inputs
        self.mask = inputs["attention_mask"]
        self.cache = None
        self.logits: list[torch.Tensor] = []
        self.banned = _special_ids(model)

    @torch.no_grad()
    def prefill(self) -> None:
        out = self.model(**self.inputs, use_cache=True)
        self._took(out)

    @torch.no_grad()
    def step(self) -> None:
        out = self.model(
            input_ids=self.next, attention_mask=self.mask, use_cache=True, **{CACHE_KWARG: self.cache}
        )
        self._took(out)

    def _took(self, out) -> None:
        last = out.logits[:, -1].float()
        self.logits.append(last)
        self.cache = output_cache(out)
        scores = last.clone()
        scores[:, self.banned] = -float("inf")
        self.next = scores.argmax(-1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones_like(self.next)], dim=1)


def _alone(model, inputs: dict) -> list[torch.Tensor]:
    chat = Chat(model, inputs)
    chat.prefill()
    for _ in range(STEPS):
        chat.step()
    return chat.logits


def _assert_same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, float(b.abs().max())), rtol=0)


def _apply(model, method: str):
    return tokprune.apply(model, method, keep_ratio=0.25, **TINY_OPTIONS.get(method, {}))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_interleaved_conversations_each_equal_their_own_run(tiny, family, method):
    """Prefill A, prefill B, then A's and B's decode steps alternating: every logit of each equals that
    conversation run alone (before the fix, B's prefill replaced the state A's cache needs)."""
    model, proc = tiny(family, "sdpa")
    a_inputs = _prompt(family, proc, 0, "describe the image please")
    b_inputs = _prompt(family, proc, 5, "w1 w2 w3 w4 what colour is it")
    with _apply(model, method) as pruner:
        expected_a, expected_b = _alone(model, a_inputs), _alone(model, b_inputs)
        a, b = Chat(model, a_inputs), Chat(model, b_inputs)
        a.prefill()
        b.prefill()
        for _ in range(STEPS):
            a.step()
            b.step()
        assert pruner.stats_for(a.cache).visual_in != [0]
        assert pruner.stats_for(a.cache) is not pruner.stats_for(b.cache)
        assert pruner.stats is pruner.stats_for(b.cache)  # the most recent prefill
    _assert_same(a.logits, expected_a)
    _assert_same(b.logits, expected_b)
    assert not torch.allclose(expected_a[0], expected_b[0])  # the two conversations really differ


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3"])
@pytest.mark.parametrize("method", ["fastv", "visionzip"])
def test_a_copied_cache_continues_like_the_original(tiny, family, method):
    """One prefix continued twice (a deep copy of its cache): both continuations equal the run alone."""
    model, proc = tiny(family, "sdpa")
    inputs = _prompt(family, proc, 0, "describe the image please")
    with _apply(model, method):
        expected = _alone(model, inputs)
        first = Chat(model, inputs)
        first.prefill()
        second = copy.copy(first)
        second.cache, second.logits = copy.deepcopy(first.cache), list(first.logits)
        for _ in range(STEPS):
            first.step()
            second.step()
    _assert_same(first.logits, expected)
    _assert_same(second.logits, expected)


@pytest.mark.parametrize("method", ["fastv", "pdrop", "visionzip"])
def test_threads_sharing_a_patched_model_get_their_own_results(tiny, method):
    """Two threads, each generating for its own prompt several times on one patched model, get exactly
    what the prompts give one after the other (calls are serialised; nothing leaks between them)."""
    model, proc = tiny("llava", "sdpa")
    prompts = [_prompt("llava", proc, seed, f"w{seed} describe the image") for seed in (0, 5)]

    def generate(inputs):
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                suppress_tokens=_special_ids(model), output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        return out.sequences, torch.stack(out.logits)

    with _apply(model, method):
        expected = [generate(p) for p in prompts]
        results: dict[tuple[int, int], tuple] = {}
        errors: list[BaseException] = []

        def worker(index: int) -> None:
            try:
                for repeat in range(4):
                    results[index, repeat] = generate(prompts[index])
            except BaseException as error:  # noqa: BLE001 - reported by the main thread
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    for (index, _), (sequences, logits) in results.items():
        assert torch.equal(sequences, expected[index][0])
        torch.testing.assert_close(logits, expected[index][1], atol=1e-5, rtol=0)
    assert len(results) == 8


def test_the_call_lock_is_released_when_a_forward_fails(tiny):
    """A forward that raises inside the model does not leave the model locked for other threads."""
    model, proc = tiny("llava", "sdpa")
    inputs = _prompt("llava", proc, 0, "describe the image please")
    with _apply(model, "fastv"):
        bad = dict(inputs, attention_mask=inputs["attention_mask"][:, :-2])
        with pytest.raises(Exception):  # noqa: B017 - any error of the model's own
            model(**bad)
        done = threading.Event()

        def other() -> None:
            with torch.no_grad():
                model(**inputs)
            done.set()

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=120)
        assert done.is_set()


def test_stats_describe_a_text_only_prefill_after_an_image_prompt(tiny):
    """`stats` is the most recent prefill's, a text-only one included: no visual tokens, nothing pruned."""
    model, proc = tiny("llava", "sdpa")
    with _apply(model, "visionzip") as pruner, torch.no_grad():
        model(**_prompt("llava", proc, 0, "describe the image please"))
        assert pruner.stats.visual_in[0] > 0
        text = dict(proc.tokenizer(["USER: tell me a story ASSISTANT:"], return_tensors="pt"))
        model(**text)
        stats = pruner.stats
    assert stats.visual_in == [0] and stats.visual_kept == [0] and stats.stages == []
    assert stats.text_tokens == [text["input_ids"].shape[1]]
    assert stats.layer_tokens == [[text["input_ids"].shape[1]] * len(stats.layer_lengths)]


@pytest.mark.parametrize("method", ["fastervlm", "fastv", "pdrop", "dart"])
def test_a_vanishing_keep_ratio_keeps_one_token_per_image(tiny, method):
    """keep_ratio=1e-12 keeps ceil(1e-12 * n) = 1 token per image (it kept none), as budget=1 does."""
    model, proc = tiny("llava", "sdpa")
    inputs = _prompt("llava", proc, 0, "describe the image please")
    with tokprune.apply(model, method, keep_ratio=1e-12) as pruner, torch.no_grad():
        model(**inputs)
    assert pruner.stats.visual_kept[0] >= 1
    if method in ("fastervlm", "fastv", "pdrop"):  # their count is exactly the budget's
        assert pruner.stats.visual_kept == [1]


def test_pdrop_with_mismatched_layers_and_ratios_says_what_to_give():
    with pytest.raises(MethodOptionError, match="give one ratio per layer.*leave ratios out"):
        tokprune.methods.make_method("pdrop", {"layers": (1, 2), "ratios": (0.5,)})


def test_a_text_only_follow_up_turn_has_its_own_stats_and_decode_steps_keep_them(tiny):
    """A hand-written loop: an image prefill, a text-only turn of several tokens on its cache (stats: that
    turn's tokens, none visual), then one-token decode steps, which never change the stats."""
    model, proc = tiny("llava", "sdpa")
    first = _prompt("llava", proc, 0, "describe the image please")
    with _apply(model, "fastv") as pruner, torch.no_grad():
        out = model(**first, use_cache=True)
        cache, image_stats = output_cache(out), pruner.stats
        assert image_stats.visual_in[0] > 0
        turn = proc.tokenizer(
            [" USER: and the colour? ASSISTANT:"], return_tensors="pt", add_special_tokens=False
        )
        mask = torch.cat([first["attention_mask"], turn["attention_mask"]], 1)
        out = model(input_ids=turn["input_ids"], attention_mask=mask, **{CACHE_KWARG: cache})
        text_stats = pruner.stats
        assert text_stats is not image_stats and text_stats.visual_in == [0] and text_stats.stages == []
        assert text_stats.text_tokens == [turn["input_ids"].shape[1]]
        step = out.logits[:, -1:].argmax(-1)
        model(
            input_ids=step, attention_mask=torch.cat([mask, torch.ones_like(step)], 1), **{CACHE_KWARG: cache}
        )
        assert pruner.stats is text_stats and pruner.stats_for(cache) is text_stats
