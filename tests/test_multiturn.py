"""Multi-turn chat on a reused KV cache: a follow-up turn keeps the earlier turns' pruned cache and prunes
only its own new images.

Protocol (as transformers' generate() supports it): the follow-up passes only the *new* tokens as
input_ids (the last generated token, which is not in the cache yet, then the new turn), the 2-D mask of
the whole unpruned conversation, the new images' pixels and the cache. The reference is the unpatched
model on the whole conversation in one prefill, with every dropped visual token (of both turns) masked
out and the original positions.
"""

from dataclasses import dataclass

import pytest
import reference
import torch
from reference import reference_logits
from test_invariants import COMPOSITION, _special_ids
from tiny_models import BUILDERS, batch_images, batch_inputs, process, prompt_text, rand_image

import tokprune
from tokprune.core.compat import CACHE_KWARG, output_cache
from tokprune.core.stats import StageStats
from tokprune.methods import make_method

TOL = 1e-5
NEW = 3
FOLLOW_UP = "and what about this one"
FIRST_TURN = (1, 2)  # images per row in turn 1; turn 2 brings one new image per row
FAMILIES = [
    "llava", "llava_next", "llava_onevision", "internvl", "smolvlm", "idefics3", "qwen2_vl", "qwen2_5_vl",
    "qwen3_vl", "qwen3_vl_moe", "gemma3",
]  # fmt: skip
TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")  # per-token types the processor returns (Qwen: M-RoPE)
# pre-LLM, in-LLM (last-query, instruction-query, visual-visual and key signals), and a composition
# SparseVLM without its recycled clusters: the whole-conversation reference below injects no in-LLM merged
# states (the turns' streams are not recorded), and its selection is what this test is about
SPARSEVLM_SELECTION = make_method("sparsevlm", {"recycle": "off"})
METHODS = ["divprune", "fastervlm", "random", "fastv", "pdrop", SPARSEVLM_SELECTION, "dart", COMPOSITION]


@dataclass
class Conversation:
    """Turn 1's inputs, the tokens that followed them (generated, new turn, generated, ...), the mask of the
    whole conversation, the last turn's generate() output and the stats of every turn."""

    first: dict
    pieces: list[torch.Tensor]
    mask: torch.Tensor
    out: object
    stats: list


def _generate(model, **inputs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0, suppress_tokens=_special_ids(model),
        )  # fmt: skip


def _new_images(batch: int, turn: int = 2) -> list[list]:
    return [[rand_image(112, 140, 10 * turn + 30 + row)] for row in range(batch)]


def _follow_up(family, proc, batch: int, turn: int = 2, padded: bool = False) -> dict:
    """The new turn of every row, with its new image: equal lengths, or (padded) row 0 shorter and
    left-padded, so that padding sits inside the conversation."""
    texts = [
        " " + prompt_text(family, 1, FOLLOW_UP + (" w1 w2 w3" * row if padded else ""))
        for row in range(batch)
    ]
    return process(family, proc, texts, _new_images(batch, turn), add_special_tokens=False, padding=padded)


def _whole_conversation_pixels(family, proc, turns: int = 2) -> dict:
    """The image tensors of every turn in the order the whole conversation's placeholders take them,
    from the processor itself (row by row: each row's first-turn images, then one per later turn)."""
    images = batch_images(family, FIRST_TURN)
    for turn in range(2, turns + 1):
        images = [old + new for old, new in zip(images, _new_images(len(FIRST_TURN), turn))]
    texts = [prompt_text(family, len(row), "x") for row in images]
    out = process(family, proc, texts, images, padding=True)
    return {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", *TYPE_KEYS)}


def _token_types(model, ids: torch.Tensor) -> dict:
    """The token types of `ids` where the model reads them: Qwen's mm_token_type_ids (1 image, 2 video) for
    M-RoPE, Gemma 3's token_type_ids (1 image) for its bidirectional image blocks."""
    image = (ids == model.config.image_token_id).long()
    if getattr(model.config, "vision_start_token_id", None) is not None:
        return {"mm_token_type_ids": image + 2 * (ids == model.config.video_token_id).long()}
    if type(model).__name__ == "Gemma3ForConditionalGeneration":
        return {"token_type_ids": image}
    return {}


def _whole(model, proc, family, talk: Conversation) -> dict:
    """The whole conversation as one prompt: its tokens, its mask, every image in order."""
    ids, mask = torch.cat([talk.first["input_ids"], *talk.pieces], dim=1), talk.mask
    pieces = talk.pieces
    return {
        "input_ids": ids, "attention_mask": mask, **_whole_conversation_pixels(family, proc, 1 + len(pieces) // 2),
        **_token_types(model, ids),
    }  # fmt: skip


def _all_turns(stats: list, n_visual: list[list[int]]):
    """Stats whose stages keep, over the whole conversation's visual tokens, what each turn's stage kept.
    n_visual[t][row]: visual tokens of row in turns before turn t."""
    wheres = [s.where for s in stats[0].stages]
    assert all([s.where for s in st.stages] == wheres for st in stats)
    stages = []
    for index, where in enumerate(wheres):
        kept = [
            torch.cat([st.stages[index].kept[row] + offsets[row] for st, offsets in zip(stats, n_visual)])
            for row in range(len(n_visual[0]))
        ]
        stages.append(StageStats.of(stats[0].stages[index].method, where, kept))
    return type(stats[0])(stages=stages)


def _conversation(model, proc, family, method, turns: int = 2, padded: bool = False) -> Conversation:
    """`turns` turns under `method`, each after the first bringing one new image per row (padded: the
    new turns left-padded to rows of different lengths)."""
    first = batch_inputs(family, proc, FIRST_TURN)
    pieces, stats, mask = [], [], first["attention_mask"]
    with tokprune.apply(model, method, keep_ratio=0.25) as pruner:
        out = _generate(model, **first)
        stats.append(pruner.stats)
        for turn in range(2, turns + 1):
            new = _follow_up(family, proc, first["input_ids"].shape[0], turn, padded)
            generated = out.sequences[:, -NEW:]
            pieces += [generated, new["input_ids"]]
            new_ids = torch.cat([generated[:, -1:], new["input_ids"]], dim=1)
            mask = torch.cat([mask, torch.ones_like(generated), new["attention_mask"]], 1)
            turn_inputs = {
                **new,
                "input_ids": new_ids,
                "attention_mask": mask,
                **_token_types(model, new_ids),
            }
            out = _generate(model, **turn_inputs, past_key_values=output_cache(out))
            stats.append(pruner.stats)
    return Conversation(first, pieces, mask, out, stats)


def _assert_last_turn_equals_the_whole_conversation(model, whole, talk: Conversation):
    """The last turn's logits (prefill and decode steps) equal the unpatched model on the `whole`
    conversation at once, each turn's dropped tokens masked from the layer its stage acts at."""
    first, pieces, out, stats = talk.first, talk.pieces, talk.out, talk.stats
    turn_ids = [first["input_ids"], *pieces[1::2]]
    before, n_visual = torch.zeros(turn_ids[0].shape[0], dtype=torch.long), []
    for ids in turn_ids:
        n_visual.append(before.tolist())
        before = before + reference.visual_mask(model, ids).sum(1)
    generated = out.sequences[:, -NEW:]
    with torch.no_grad():
        expected = reference_logits(model, whole, _all_turns(stats, n_visual), None, generated[:, : NEW - 1])
    for step in range(NEW):
        logits = expected[0][:, -1] if step == 0 else expected[step]
        scale = max(1.0, float(logits.abs().max()))
        torch.testing.assert_close(out.logits[step], logits, atol=TOL * scale, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "method", METHODS, ids=lambda m: m if isinstance(m, str) else getattr(m, "name", "composition")
)
def test_follow_up_turn_equals_the_masked_whole_conversation(tiny, family, method, attn):
    model, proc = tiny(family, attn)
    talk = _conversation(model, proc, family, method)
    # the second turn pruned exactly its own new images, to the budget
    visual2, stats2 = talk.pieces[1] == model.config.image_token_id, talk.stats[1]
    assert stats2.visual_in == visual2.sum(1).tolist()
    assert (
        stats2.visual_kept == [int(k.numel()) for k in stats2.kept] and stats2.visual_kept < stats2.visual_in
    )
    _assert_last_turn_equals_the_whole_conversation(model, _whole(model, proc, family, talk), talk)


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "qwen2_5_vl", "gemma3"])
@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_a_left_padded_follow_up_turn(tiny, family, method):
    """Rows whose new turns differ in length: the shorter one is left-padded, so padding sits in the middle
    of the conversation, between the cache and the new tokens.

    Gemma 3 runs with a sliding window longer than the conversation: transformers counts a window in cache
    slots, padding slots included, and its sliding cache keeps only that many slots, so padding inside the
    window pushes earlier tokens out of it (with or without tokprune); the masked reference counts tokens.
    """
    if family == "gemma3":
        model, proc = BUILDERS["gemma3"]("sdpa")  # a model of its own: the shared one keeps its window
        model.config.get_text_config().sliding_window = 4096
    else:
        model, proc = tiny(family)
    talk = _conversation(model, proc, family, method, padded=True)
    assert not talk.mask[:, talk.first["input_ids"].shape[1] :].all()
    _assert_last_turn_equals_the_whole_conversation(model, _whole(model, proc, family, talk), talk)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize(
    "method", ["divprune", COMPOSITION], ids=lambda m: m if isinstance(m, str) else "composition"
)
def test_a_third_turn_continues_the_twice_pruned_cache(tiny, family, method):
    """Three turns with new images: the masks of every stage and (Qwen) the position shift carry over."""
    model, proc = tiny(family)
    talk = _conversation(model, proc, family, method, turns=3)
    _assert_last_turn_equals_the_whole_conversation(model, _whole(model, proc, family, talk), talk)


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
        out2 = _generate(model, input_ids=new_ids, attention_mask=mask, past_key_values=output_cache(out1))
        turn = pruner.stats  # the text-only turn's own: nothing visual, every layer saw its tokens
        assert turn is not stats1 and turn.visual_in == [0, 0] and turn.stages == []
        assert turn.text_tokens == extra["attention_mask"].sum(1).add(1).tolist()
        assert pruner.stats_for(output_cache(out2)) is turn
    gen2 = out2.sequences[:, -NEW:]
    pixels = {k: v for k, v in first.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
    whole = {
        "input_ids": torch.cat([first["input_ids"], gen1, extra["input_ids"]], dim=1),
        "attention_mask": mask,
    }
    with torch.no_grad():
        expected = reference_logits(model, {**whole, **pixels}, stats1, None, gen2[:, : NEW - 1])
    for step in range(NEW):
        logits = expected[0][:, -1] if step == 0 else expected[step]
        torch.testing.assert_close(
            out2.logits[step], logits, atol=TOL * max(1.0, float(logits.abs().max())), rtol=0
        )


@pytest.mark.parametrize("family", ["llava", "internvl", "qwen2_5_vl"])
def test_follow_up_scores_attend_to_the_earlier_turns(tiny, family):
    """FastV scores a follow-up's new image by the last token's attention over the whole conversation (the
    cache included): it keeps what FastV keeps of that image when the conversation is one prompt."""
    model, proc = tiny(family)
    talk = _conversation(model, proc, family, "fastv")
    first, stats, whole = talk.first, talk.stats, _whole(model, proc, family, talk)
    with tokprune.apply(model, "fastv", keep_ratio=0.25) as pruner, torch.no_grad():
        model(**whole)
    n_visual1 = (first["input_ids"] == model.config.image_token_id).sum(1).tolist()
    for row, n in enumerate(n_visual1):
        kept = pruner.stats.kept[row]
        assert torch.equal(kept[kept >= n] - n, stats[1].kept[row])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_a_follow_up_that_brings_a_video(tiny, family, method):
    """Turn 1 shows an image per row, turn 2 a video clip per row: the clip is pruned on arrival and gets
    the temporal M-RoPE rows the whole conversation would give it."""
    from test_video import _frames, _video_text, video_batch, video_pixels

    model, proc = tiny(family)
    first, _ = video_batch(family, proc, (("image",), ("image",)))
    clips = [video_pixels(_frames(4, 56, 84, seed=10 + row), proc.image_processor) for row in range(2)]
    text = " USER: " + _video_text(family, clips[0][1]) + " what happens ASSISTANT:"
    with tokprune.apply(model, method, keep_ratio=0.25) as pruner:
        out1 = _generate(model, **first)
        stats = [pruner.stats]
        second = proc.tokenizer([text] * 2, return_tensors="pt", add_special_tokens=False)
        pieces = [out1.sequences[:, -NEW:], second["input_ids"]]
        new_ids = torch.cat([pieces[0][:, -1:], second["input_ids"]], dim=1)
        videos = {
            "pixel_values_videos": torch.cat([pixels for pixels, _ in clips]),
            "video_grid_thw": torch.tensor([grid for _, grid in clips]),
        }
        mask = torch.cat([first["attention_mask"], *(torch.ones_like(p) for p in pieces)], 1)
        out = _generate(
            model, input_ids=new_ids, attention_mask=mask, past_key_values=output_cache(out1), **videos,
            **_token_types(model, new_ids),
        )  # fmt: skip
        stats.append(pruner.stats)
    assert stats[1].visual_in == reference.visual_mask(model, second["input_ids"]).sum(1).tolist()
    ids = torch.cat([first["input_ids"], *pieces], dim=1)
    whole = {
        "input_ids": ids, "attention_mask": mask, "pixel_values": first["pixel_values"],
        "image_grid_thw": first["image_grid_thw"], **videos, **_token_types(model, ids),
    }  # fmt: skip
    _assert_last_turn_equals_the_whole_conversation(
        model, whole, Conversation(first, pieces, mask, out, stats)
    )


def test_a_follow_up_that_brings_a_video_on_llava_onevision(tiny, monkeypatch):
    """LLaVA-OneVision: turn 2 brings a clip per row after turn 1's images; the clip is pruned on arrival."""
    from test_video_onevision import _visual
    from tiny_onevision import rand_clip

    monkeypatch.setattr(reference, "visual_mask", _visual)  # <video> placeholders are visual tokens too
    model, proc = tiny("llava_onevision")
    first = batch_inputs("llava_onevision", proc, FIRST_TURN)
    with tokprune.apply(model, "divprune", keep_ratio=0.25) as pruner:
        out1 = _generate(model, **first)
        stats = [pruner.stats]
        clips = [rand_clip(3, seed=10 + row) for row in range(2)]
        second = proc(
            text=[" USER: <video> what happens ASSISTANT:"] * 2, videos=clips, return_tensors="pt",
            add_special_tokens=False,
        )  # fmt: skip
        pieces = [out1.sequences[:, -NEW:], second["input_ids"]]
        new_ids = torch.cat([pieces[0][:, -1:], second["input_ids"]], dim=1)
        mask = torch.cat([first["attention_mask"], *(torch.ones_like(p) for p in pieces)], 1)
        videos = {"pixel_values_videos": second["pixel_values_videos"]}
        out = _generate(
            model, input_ids=new_ids, attention_mask=mask, past_key_values=output_cache(out1), **videos
        )
        stats.append(pruner.stats)
    assert stats[1].visual_in == _visual(model, second["input_ids"]).sum(1).tolist()
    assert stats[1].visual_kept < stats[1].visual_in
    images = {k: v for k, v in first.items() if k not in ("input_ids", "attention_mask")}
    whole = {
        "input_ids": torch.cat([first["input_ids"], *pieces], 1),
        "attention_mask": mask,
        **images,
        **videos,
    }
    _assert_last_turn_equals_the_whole_conversation(
        model, whole, Conversation(first, pieces, mask, out, stats)
    )


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "internvl"])
@pytest.mark.parametrize(
    "method", ["divprune", "fastv", COMPOSITION], ids=lambda m: m if isinstance(m, str) else "composition"
)
def test_follow_up_under_flash_attention_2_equals_sdpa(family, method):
    """transformers' flash_attention_2 path (reference kernel on the CPU) on a follow-up turn: the cache
    of the pruned earlier turns, rows left-padded in both turns and the new turn's pruned image give the
    sdpa run. fp32 on the CPU, with the stand-in's explicit fp32 opt-in; one-row follow-ups, bf16 and the
    real kernel on a GPU: tests/test_flash_varlen.py."""
    from flash_reference import real_flash_attention, reference_flash_attention
    from test_flash_varlen import Run, _flash_model

    if real_flash_attention():
        pytest.skip("fp32 CPU comparison (flash-attn refuses fp32): test_flash_varlen.py runs on the GPU")
    flash, sdpa, proc = _flash_model(family, Run("cpu", torch.float32, TOL))
    expected = _conversation(sdpa, proc, family, method, padded=True)
    with reference_flash_attention(allow_fp32=True) as calls:
        got = _conversation(flash, proc, family, method, padded=True)
    assert calls and all(torch.equal(a, b) for a, b in zip(got.pieces, expected.pieces))
    assert all(torch.equal(x, y) for a, b in zip(got.stats, expected.stats) for x, y in zip(a.kept, b.kept))
    for a, b in zip(got.out.logits, expected.out.logits):
        torch.testing.assert_close(a, b, atol=TOL * max(1.0, float(b.abs().max())), rtol=0)


@pytest.mark.parametrize("family", ["llava", "internvl", "qwen2_5_vl", "qwen3_vl", "gemma3"])
@pytest.mark.parametrize(
    "method", ["divprune", "fastv", COMPOSITION], ids=lambda m: m if isinstance(m, str) else "composition"
)
def test_a_follow_up_through_hand_written_forward_calls(tiny, family, method):
    """A follow-up run by plain model() calls (no generate(), no position_ids): its prefill on the cache
    of the pruned first turn, then a decode loop that only grows the mask, give generate()'s logits for
    that turn (which the tests above check against the masked whole conversation)."""
    model, proc = tiny(family)
    talk = _conversation(model, proc, family, method)
    first = talk.first
    new = _follow_up(family, proc, first["input_ids"].shape[0])
    generated, later = talk.pieces[0], talk.out.sequences[:, -NEW:]
    with tokprune.apply(model, method, keep_ratio=0.25), torch.no_grad():
        cache = output_cache(_generate(model, **first))  # turn 1 again: the cache generate() extended is gone
        ids = torch.cat([generated[:, -1:], new["input_ids"]], dim=1)
        mask = torch.cat([first["attention_mask"], torch.ones_like(generated), new["attention_mask"]], 1)
        inputs = {**new, "input_ids": ids, "attention_mask": mask, **_token_types(model, ids)}
        out = model(**inputs, use_cache=True, **{CACHE_KWARG: cache})
        logits = [out.logits[:, -1]]
        for step in range(1, NEW):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(
                input_ids=later[:, step - 1 : step], attention_mask=mask, **{CACHE_KWARG: output_cache(out)}
            )
            logits.append(out.logits[:, -1])
    for got, expected in zip(logits, talk.out.logits):
        torch.testing.assert_close(got, expected, atol=TOL * max(1.0, float(expected.abs().max())), rtol=0)
