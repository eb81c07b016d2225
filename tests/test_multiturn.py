"""Multi-turn chat on a reused KV cache: a follow-up turn keeps the earlier turns' pruned cache and prunes
only its own new images.

Protocol (as transformers' generate() supports it): the follow-up passes only the *new* tokens as
input_ids (the last generated token, which is not in the cache yet, then the new turn), the 2-D mask of
the whole unpruned conversation, the new images' pixels and the cache. The reference is the unpatched
model on the whole conversation in one prefill, with every dropped visual token (of both turns) masked
out and the original positions.
"""

import pytest
import torch
from test_invariants import _special_ids
from tiny_models import batch_inputs, prompt_text, rand_image

import tokprune
from tokprune.errors import UnsupportedInputError

TOL = 1e-5
NEW = 3
FOLLOW_UP = "and what about this one"


def _generate(model, **inputs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0, suppress_tokens=_special_ids(model),
        )  # fmt: skip


def _follow_up(family, proc, batch: int, images_per_row: int) -> dict:
    """The new turn of every row (equal lengths: no padding inside it), with its new images."""
    text = " " + prompt_text(family, images_per_row, FOLLOW_UP)
    images = [rand_image(112, 140, 50 + i) for i in range(batch * images_per_row)]
    out = proc(text=[text] * batch, images=images, return_tensors="pt", add_special_tokens=False)
    return dict(out)


def _dropped(stats, visual: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: visual positions of `visual` (B, L) whose rank is not in the stats' kept set."""
    dropped = torch.zeros_like(visual)
    for row, kept in enumerate(stats.kept):
        positions = visual[row].nonzero().squeeze(1)
        keep = torch.zeros(positions.numel(), dtype=torch.bool)
        keep[kept] = True
        dropped[row, positions[~keep]] = True
    return dropped


def _in_prompt_order(first: dict, second: dict, images_per_row) -> dict:
    """Image tensors of both turns (one image per row in the second) in the order the whole conversation's
    placeholders take them: row by row, each row's first-turn images, then its new one."""
    order, start = [], 0
    for row, n in enumerate(images_per_row):
        order += [("first", start + i) for i in range(n)] + [("second", row)]
        start += n
    turns = {"first": first, "second": second}
    keys = [k for k in first if k in second and k.startswith(("pixel_values", "image_sizes"))]
    return {k: torch.stack([turns[t][k][i] for t, i in order]) for k in keys}


def _conversation(model, proc, family, method, images_per_row=(1, 2)):
    """Two turns under `method`: (turn-1 inputs and output, turn-2 inputs and output, stats of each)."""
    first = batch_inputs(family, proc, images_per_row)
    with tokprune.apply(model, method, keep_ratio=0.25) as pruner:
        out1 = _generate(model, **first)
        stats1 = pruner.stats
        second = _follow_up(family, proc, first["input_ids"].shape[0], 1)
        gen1 = out1.sequences[:, first["input_ids"].shape[1] :]
        new_ids = torch.cat([gen1[:, -1:], second["input_ids"]], dim=1)
        mask = torch.cat(
            [first["attention_mask"], torch.ones_like(gen1), torch.ones_like(second["input_ids"])], 1
        )
        turn2 = {**second, "input_ids": new_ids, "attention_mask": mask}
        out2 = _generate(model, **turn2, past_key_values=out1.past_key_values)
        stats2 = pruner.stats
    return first, gen1, second, out2, stats1, stats2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
@pytest.mark.parametrize("method", ["divprune", "fastervlm", "random"])
def test_follow_up_turn_equals_the_masked_whole_conversation(tiny, family, method, attn):
    model, proc = tiny(family, attn)
    first, gen1, second, out2, stats1, stats2 = _conversation(model, proc, family, method)
    image_id = model.config.image_token_id
    # the second turn pruned exactly its own new images, to the budget
    visual2 = second["input_ids"] == image_id
    assert stats2.visual_in == visual2.sum(1).tolist()
    assert (
        stats2.visual_kept == [int(k.numel()) for k in stats2.kept] and stats2.visual_kept < stats2.visual_in
    )
    # reference: the whole conversation at once, dropped tokens of both turns masked, original positions
    gen2 = out2.sequences[:, -NEW:]
    ids = torch.cat([first["input_ids"], gen1, second["input_ids"]], dim=1)
    real = torch.cat(
        [first["attention_mask"], torch.ones_like(gen1), torch.ones_like(second["input_ids"])], 1
    )
    keep = real.bool().clone()
    n1 = first["input_ids"].shape[1]
    keep[:, :n1] &= ~_dropped(stats1, first["input_ids"] == image_id)
    keep[:, n1 + gen1.shape[1] :] &= ~_dropped(stats2, visual2)
    pixels = _in_prompt_order(first, second, images_per_row=(1, 2))
    for step in range(NEW):
        full = torch.cat([ids, gen2[:, :step]], dim=1)
        mask = torch.cat([keep, torch.ones_like(gen2[:, :step], dtype=torch.bool)], dim=1).long()
        positions = (torch.cat([real, torch.ones_like(gen2[:, :step])], 1).cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=full, attention_mask=mask, position_ids=positions, **pixels).logits[
                :, -1
            ]
        scale = max(1.0, float(logits.abs().max()))
        torch.testing.assert_close(out2.logits[step], logits, atol=TOL * scale, rtol=0)


def test_text_only_follow_up_keeps_the_pruned_cache(tiny):
    """A follow-up without images passes through (nothing new to prune) and still sees turn 1 pruned."""
    model, proc = tiny("llava")
    first = batch_inputs("llava", proc, (1, 2))
    with tokprune.apply(model, "divprune", keep_ratio=0.25) as pruner:
        out1 = _generate(model, **first)
        stats1 = pruner.stats
        gen1 = out1.sequences[:, first["input_ids"].shape[1] :]
        extra = proc.tokenizer(
            [" USER: " + FOLLOW_UP + " ASSISTANT:"] * 2, return_tensors="pt", add_special_tokens=False
        )
        new_ids = torch.cat([gen1[:, -1:], extra["input_ids"]], dim=1)
        mask = torch.cat([first["attention_mask"], torch.ones_like(gen1), extra["attention_mask"]], 1)
        out2 = _generate(model, input_ids=new_ids, attention_mask=mask, past_key_values=out1.past_key_values)
    ids = torch.cat([first["input_ids"], gen1, extra["input_ids"]], dim=1)
    keep = mask.bool().clone()
    n1 = first["input_ids"].shape[1]
    keep[:, :n1] &= ~_dropped(stats1, first["input_ids"] == model.config.image_token_id)
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=keep.long(), position_ids=(mask.cumsum(1) - 1).clamp(min=0),
            pixel_values=first["pixel_values"],
        ).logits[:, -1]  # fmt: skip
    torch.testing.assert_close(out2.logits[0], logits, atol=TOL * max(1.0, float(logits.abs().max())), rtol=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_follow_up_images_are_refused_where_positions_or_masks_span_the_whole_conversation(tiny, family):
    model, proc = tiny(family)
    first = batch_inputs(family, proc, (1, 1))
    with tokprune.apply(model, "divprune", keep_ratio=0.25):
        out1 = _generate(model, **first)
        cache = out1.past_key_values
        second = batch_inputs(family, proc, (1, 1))
        with pytest.raises(UnsupportedInputError, match="follow-up turn"), torch.no_grad():
            model(**second, past_key_values=cache)


def test_follow_up_images_under_an_in_llm_method_are_refused(tiny):
    model, proc = tiny("llava")
    first = batch_inputs("llava", proc, (1, 1))
    with tokprune.apply(model, "fastv", keep_ratio=0.25):
        out1 = _generate(model, **first)
        with pytest.raises(UnsupportedInputError, match="pre-LLM methods only; fastv"), torch.no_grad():
            model(**first, past_key_values=out1.past_key_values)
