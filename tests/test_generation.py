"""generate() modes whose prefill is not one forward over exactly the prompt.

Assisted generation (speculative decoding with a draft model) verifies the first drafts in the prefill
itself and crops rejected drafts from every layer's cache. Every method's assisted greedy
output equals plain greedy generate(), through pruned caches of different lengths per layer (in-LLM
methods) being cropped; methods that read the prompt's text read the prompt alone, not the drafts after
it; so do the steps of generate(use_cache=False), which re-run the prompt with the tokens generated so
far. (Prompt lookup, `prompt_lookup_num_tokens=`, fails in transformers 5.24 itself on prompts with
images: its drafts copy image placeholders. tokprune passes it through.) Chunked prefill splits images
across forwards: refused for prompts with images.
"""

import pytest
import torch
from test_invariants import COMPOSITION, TINY_OPTIONS, _special_ids
from tiny_models import BUILDERS, batch_inputs
from transformers import DynamicCache

import tokprune
from tokprune import errors
from tokprune.methods import REGISTRY

NEW = 10
_MODELS: dict = {}


def _main_and_draft(family: str):
    """(model, a draft model of the same shape with perturbed weights, processor)."""
    if family not in _MODELS:
        model, proc = BUILDERS[family]("sdpa")
        draft, _ = BUILDERS[family]("sdpa")
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in draft.parameters():
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
        _MODELS[family] = (model, draft, proc)
    return _MODELS[family]


def _greedy(model, inputs: dict, **kwargs) -> torch.Tensor:
    """NEW greedy tokens; token 0 suppressed unless told (the tiny Gemma 3 would repeat it, main and draft
    alike)."""
    kwargs = {"suppress_tokens": [0], **kwargs}
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs
        )


def _assisted_equals_greedy(family: str, method, monkeypatch) -> None:
    model, draft, proc = _main_and_draft(family)
    inputs = batch_inputs(family, proc, (2,))  # assisted generation takes one row
    removed: list[int] = []
    crop = DynamicCache.crop
    monkeypatch.setattr(DynamicCache, "crop", lambda self, n: (removed.append(-n), crop(self, n))[1])
    options = TINY_OPTIONS.get(method, {}) if isinstance(method, str) else {}
    with tokprune.apply(model, method, keep_ratio=0.25, **options) as pruner:
        expected, expected_kept = _greedy(model, inputs), pruner.stats.kept
        got = _greedy(model, inputs, assistant_model=draft)
        assert all(torch.equal(a, b) for a, b in zip(pruner.stats.kept, expected_kept))
    assert torch.equal(got, expected)
    assert any(removed)  # some drafts were rejected: pruned caches were cropped
    assert "generate" not in model.__dict__  # the wrapper is gone with the pruner


# every method the families below take (AnyRes-only ones need tiles), and a composition
METHODS = [m for m in tokprune.available_methods() if not REGISTRY[m].needs_tiles] + [COMPOSITION]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m if isinstance(m, str) else "composition")
def test_assisted_generation_equals_greedy(family, method, monkeypatch):
    _assisted_equals_greedy(family, method, monkeypatch)


@pytest.mark.parametrize("family", ["llava", "gemma3"])  # Qwen2.5-VL: transformers fails here unpatched
@pytest.mark.parametrize("method", ["fastv", "sparsevlm", "cdpruner", "divprune"])
def test_an_assisted_follow_up_turn_equals_a_plain_one(family, method):
    """A follow-up turn (new tokens + new image on the pruned cache) generated with an assistant: the text
    signals read the new turn's prompt, not the drafts, so it keeps what a plain follow-up keeps."""
    from test_multiturn import _follow_up, _token_types

    model, draft, proc = _main_and_draft(family)
    runs = []
    for assist in ({}, {"assistant_model": draft}):
        first = batch_inputs(family, proc, (1,))
        with tokprune.apply(model, method, keep_ratio=0.25) as pruner, torch.no_grad():
            out = model.generate(
                **first, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                return_dict_in_generate=True, suppress_tokens=_special_ids(model),
            )  # fmt: skip
            new = _follow_up(family, proc, 1)
            ids = torch.cat([out.sequences[:, -1:], new["input_ids"]], dim=1)
            mask = torch.cat([first["attention_mask"], torch.ones_like(out.sequences[:, -NEW:])], 1)
            turn = {**new, "input_ids": ids, **_token_types(model, ids)}
            turn["attention_mask"] = torch.cat([mask, new["attention_mask"]], 1)
            suppress = [0, *_special_ids(model)]  # a generated (or drafted) image token would be a new image
            tokens = _greedy(
                model, turn, past_key_values=out.past_key_values, suppress_tokens=suppress, **assist
            )
            runs.append((tokens[:, -NEW:], pruner.stats.kept))
    (plain, plain_kept), (assisted, assisted_kept) = runs
    assert all(torch.equal(a, b) for a, b in zip(assisted_kept, plain_kept))
    assert torch.equal(assisted, plain)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m if isinstance(m, str) else "composition")
def test_generate_without_cache_prunes_like_with_it(family, method):
    """use_cache=False re-runs the prompt and the tokens generated so far at every step: the text signals
    still read the prompt alone, so every step keeps the prefill's tokens and the output is the cached one."""
    model, _, proc = _main_and_draft(family)
    inputs = batch_inputs(family, proc, (1, 2))
    options = TINY_OPTIONS.get(method, {}) if isinstance(method, str) else {}
    with tokprune.apply(model, method, keep_ratio=0.25, **options) as pruner:
        # a generated image placeholder would be a new image token in the next full forward
        special = {"suppress_tokens": [0, *_special_ids(model)]}
        expected, expected_kept = _greedy(model, inputs, **special), pruner.stats.kept
        got = _greedy(model, inputs, use_cache=False, **special)
        assert all(torch.equal(a, b) for a, b in zip(pruner.stats.kept, expected_kept))  # the last step's
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_chunked_prefill_of_a_prompt_with_images_is_refused(method):
    """prefill_chunk_size splits an image across forwards: refused; a text-only prompt passes through."""
    model, _, proc = _main_and_draft("llava")
    inputs = batch_inputs("llava", proc, (1, 2))
    text = dict(proc.tokenizer(["USER: hello there, how are you? ASSISTANT:"], return_tensors="pt"))
    expected = _greedy(model, text)
    with tokprune.apply(model, method, keep_ratio=0.25):
        with pytest.raises(errors.UnsupportedInputError, match="prefill_chunk_size"):
            _greedy(model, inputs, prefill_chunk_size=32)
        assert torch.equal(_greedy(model, text, prefill_chunk_size=4), expected)
