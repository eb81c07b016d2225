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
from reference import reference_logits
from test_invariants import COMPOSITION, _special_ids
from tiny_models import batch_images, batch_inputs, process, prompt_text, rand_image

import tokprune
from tokprune.core.stats import StageStats
from tokprune.errors import UnsupportedInputError

TOL = 1e-5
NEW = 3
FOLLOW_UP = "and what about this one"
FIRST_TURN = (1, 2)  # images per row in turn 1; turn 2 brings one new image per row
FAMILIES = ["llava", "llava_next", "llava_onevision", "internvl", "smolvlm", "idefics3"]
# pre-LLM, in-LLM (last-query, instruction-query, visual-visual and key signals), and a composition
METHODS = ["divprune", "fastervlm", "random", "fastv", "pdrop", "sparsevlm", "dart", COMPOSITION]


def _generate(model, **inputs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0, suppress_tokens=_special_ids(model),
        )  # fmt: skip


def _new_images(batch: int) -> list[list]:
    return [[rand_image(112, 140, 50 + row)] for row in range(batch)]


def _follow_up(family, proc, batch: int) -> dict:
    """The new turn of every row (equal lengths: no padding inside it), with its new image."""
    text = " " + prompt_text(family, 1, FOLLOW_UP)
    return process(family, proc, [text] * batch, _new_images(batch), add_special_tokens=False)


def _whole_conversation_pixels(family, proc) -> dict:
    """The image tensors of both turns in the order the whole conversation's placeholders take them,
    from the processor itself (row by row: each row's first-turn images, then its new one)."""
    first = batch_images(family, FIRST_TURN)
    images = [old + new for old, new in zip(first, _new_images(len(FIRST_TURN)))]
    texts = [prompt_text(family, len(row), "x") for row in images]
    out = process(family, proc, texts, images, padding=True)
    return {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}


def _both_turns(stats1, stats2, n_visual1: list[int]):
    """Stats whose stages keep, over the whole conversation's visual tokens, what each turn's stage kept."""
    assert [s.where for s in stats1.stages] == [s.where for s in stats2.stages]
    stages = [
        StageStats.of(
            a.method, a.where, [torch.cat([k1, k2 + n]) for k1, k2, n in zip(a.kept, b.kept, n_visual1)]
        )
        for a, b in zip(stats1.stages, stats2.stages)
    ]
    return type(stats1)(stages=stages)


def _conversation(model, proc, family, method):
    """Two turns under `method`: (turn-1 inputs, its generated tokens, turn-2 inputs, turn-2 output, stats
    of each turn)."""
    first = batch_inputs(family, proc, FIRST_TURN)
    with tokprune.apply(model, method, keep_ratio=0.25) as pruner:
        out1 = _generate(model, **first)
        stats1 = pruner.stats
        second = _follow_up(family, proc, first["input_ids"].shape[0])
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
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m if isinstance(m, str) else "composition")
def test_follow_up_turn_equals_the_masked_whole_conversation(tiny, family, method, attn):
    model, proc = tiny(family, attn)
    first, gen1, second, out2, stats1, stats2 = _conversation(model, proc, family, method)
    image_id = model.config.image_token_id
    # the second turn pruned exactly its own new images, to the budget
    visual1, visual2 = first["input_ids"] == image_id, second["input_ids"] == image_id
    assert stats2.visual_in == visual2.sum(1).tolist()
    assert (
        stats2.visual_kept == [int(k.numel()) for k in stats2.kept] and stats2.visual_kept < stats2.visual_in
    )
    # reference: the whole conversation at once, each turn's dropped tokens masked from the layer its stage
    # acts at, original positions
    gen2 = out2.sequences[:, -NEW:]
    whole = {
        "input_ids": torch.cat([first["input_ids"], gen1, second["input_ids"]], dim=1),
        "attention_mask": torch.cat(
            [first["attention_mask"], torch.ones_like(gen1), torch.ones_like(second["input_ids"])], 1
        ),
        **_whole_conversation_pixels(family, proc),
    }
    stats = _both_turns(stats1, stats2, visual1.sum(1).tolist())
    with torch.no_grad():
        reference = reference_logits(model, whole, stats, None, gen2[:, : NEW - 1])
    for step in range(NEW):
        logits = reference[0][:, -1] if step == 0 else reference[step]
        scale = max(1.0, float(logits.abs().max()))
        torch.testing.assert_close(out2.logits[step], logits, atol=TOL * scale, rtol=0)


@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize(
    "method", ["divprune", "fastv", COMPOSITION], ids=lambda m: m if isinstance(m, str) else "composition"
)
def test_text_only_follow_up_keeps_the_pruned_cache(tiny, family, method):
    """A follow-up without images passes through (nothing new to prune) and still sees turn 1 pruned, in
    every layer as its stages left it."""
    model, proc = tiny(family)
    first = batch_inputs(family, proc, FIRST_TURN)
    with tokprune.apply(model, method, keep_ratio=0.25) as pruner:
        out1 = _generate(model, **first)
        stats1 = pruner.stats
        gen1 = out1.sequences[:, first["input_ids"].shape[1] :]
        extra = proc.tokenizer(
            [" USER: " + FOLLOW_UP + " ASSISTANT:"] * 2, return_tensors="pt", add_special_tokens=False
        )
        new_ids = torch.cat([gen1[:, -1:], extra["input_ids"]], dim=1)
        mask = torch.cat([first["attention_mask"], torch.ones_like(gen1), extra["attention_mask"]], 1)
        out2 = _generate(model, input_ids=new_ids, attention_mask=mask, past_key_values=out1.past_key_values)
        assert pruner.stats is stats1  # nothing new was pruned
    gen2 = out2.sequences[:, -NEW:]
    pixels = {k: v for k, v in first.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
    whole = {
        "input_ids": torch.cat([first["input_ids"], gen1, extra["input_ids"]], dim=1),
        "attention_mask": mask,
    }
    with torch.no_grad():
        reference = reference_logits(model, {**whole, **pixels}, stats1, None, gen2[:, : NEW - 1])
    for step in range(NEW):
        logits = reference[0][:, -1] if step == 0 else reference[step]
        torch.testing.assert_close(
            out2.logits[step], logits, atol=TOL * max(1.0, float(logits.abs().max())), rtol=0
        )


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


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_follow_up_scores_attend_to_the_earlier_turns(tiny, family):
    """FastV scores a follow-up's new image by the last token's attention over the whole conversation (the
    cache included): it keeps what FastV keeps of that image when the conversation is one prompt."""
    model, proc = tiny(family)
    first, gen1, second, _, stats1, stats2 = _conversation(model, proc, family, "fastv")
    whole = {
        "input_ids": torch.cat([first["input_ids"], gen1, second["input_ids"]], dim=1),
        "attention_mask": torch.cat(
            [first["attention_mask"], torch.ones_like(gen1), torch.ones_like(second["input_ids"])], 1
        ),
        **_whole_conversation_pixels(family, proc),
    }
    with tokprune.apply(model, "fastv", keep_ratio=0.25) as pruner, torch.no_grad():
        model(**whole)
    n_visual1 = (first["input_ids"] == model.config.image_token_id).sum(1).tolist()
    for row, n in enumerate(n_visual1):
        kept = pruner.stats.kept[row]
        assert torch.equal(kept[kept >= n] - n, stats2.kept[row])
