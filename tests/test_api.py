"""The public API contract (DESIGN §3): errors, pass-through, hooks on instances, decode loops, stats."""

import pytest
import torch
from reference import original_positions
from tiny_models import BUILDERS, batch_inputs, text_inputs

import tokprune
from tokprune import errors
from tokprune.core.budget import Budget
from tokprune.core.compat import CACHE_KWARG, output_cache


def test_unknown_method_lists_available(tiny):
    model, _ = tiny("llava")
    with pytest.raises(errors.UnknownMethodError) as info:
        tokprune.apply(model, "no-such-method")
    for name in tokprune.available_methods():
        assert name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unsupported_model_names_class_and_families():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(errors.UnsupportedModelError) as info:
        tokprune.apply(model, "random")
    assert "Linear" in str(info.value)
    for name in tokprune.available_models():
        assert name in str(info.value)
    assert isinstance(info.value, TypeError)


def test_compiled_and_wrapped_models_say_what_to_pass(tiny):
    model, _ = tiny("llava")
    with pytest.raises(errors.UnsupportedModelError, match="torch.compile'd LlavaForConditionalGeneration"):
        tokprune.apply(torch.compile(model), "random")  # compiles lazily: nothing is compiled here

    class Wrapper(torch.nn.Module):  # the shape of a PEFT model
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_model(self):
            return self.base

    with pytest.raises(errors.UnsupportedModelError, match="pass model.get_base_model()"):
        tokprune.apply(Wrapper(model), "random")
    assert not hasattr(model, "_tokprune_pruner")  # nothing was installed on the model itself


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(budget=0),
        dict(budget=-3),
        dict(budget=2.5),
        dict(keep_ratio=0.0),
        dict(keep_ratio=1.5),
        dict(keep_ratio=-0.1),
        dict(budget=8, keep_ratio=0.5),
        dict(budget=True),
        dict(keep_ratio=float("nan")),
        dict(budget="8"),
    ],
)
def test_bad_budgets(tiny, kwargs):
    model, _ = tiny("llava")
    with pytest.raises(errors.BudgetError):
        tokprune.apply(model, "fastervlm", **kwargs)
    assert not hasattr(model, "_tokprune_pruner")


def test_numpy_budgets_are_numbers(tiny):
    import numpy as np

    model, _ = tiny("llava")
    for kwargs, expected in [
        (dict(budget=np.int64(8)), Budget(tokens=8)),
        (dict(keep_ratio=np.float32(0.25)), Budget(ratio=0.25)),
    ]:
        with tokprune.apply(model, "fastervlm", **kwargs) as pruner:
            assert pruner.budgets == [expected] and type(pruner.budgets[0].tokens or 0) is int


def test_unknown_option_lists_options(tiny):
    model, _ = tiny("llava")
    with pytest.raises(errors.MethodOptionError, match="layer"):
        tokprune.apply(model, "fastv", depth=3)


def test_out_of_range_layer(tiny):
    model, _ = tiny("llava")
    with pytest.raises(errors.MethodOptionError, match="layer"):
        tokprune.apply(model, "fastv", layer=4)


def test_pdrop_ratios_with_budget_is_an_error(tiny):
    model, _ = tiny("llava")
    with pytest.raises(errors.BudgetError):
        tokprune.apply(model, "pdrop", ratios=(0.5, 0.5, 0.5), budget=8)


def test_already_patched_says_remove_or_compose(tiny):
    model, _ = tiny("llava")
    with tokprune.apply(model, "random"), pytest.raises(errors.AlreadyPatchedError, match="remove"):
        tokprune.apply(model, "fastv")
    # removed: applying again works
    tokprune.apply(model, "fastv").remove()


def test_text_only_prompt_passes_through(tiny):
    model, proc = tiny("qwen2_vl")
    inputs = text_inputs(proc)
    with torch.no_grad():
        ref = model(**inputs).logits
        with tokprune.apply(model, "fastv", keep_ratio=0.25) as pruner:
            out = model(**inputs).logits
    assert torch.equal(out, ref)
    assert (
        pruner.stats.visual_in == [0] and pruner.stats.stages == []
    )  # a text-only prefill: nothing to prune


@pytest.mark.parametrize("method", ["visionzip", "fastv"])
def test_budget_at_or_above_token_count_keeps_everything(tiny, method):
    model, proc = tiny("llava")
    inputs = batch_inputs("llava", proc, (1, 2))
    with torch.no_grad():
        ref = model(**inputs).logits
        with tokprune.apply(model, method, budget=49) as pruner:
            out = model(**inputs).logits
    assert torch.equal(out, ref)
    assert pruner.stats.visual_kept == pruner.stats.visual_in


def test_hooks_are_per_instance(tiny):
    """Two models of the same class in one process: patching one leaves the other untouched."""
    from tiny_models import tiny_llava

    model, proc = tiny("llava")
    other, _ = tiny_llava()
    inputs = batch_inputs("llava", proc, (1, 1))
    with torch.no_grad():
        ref = other(**inputs).logits
        with tokprune.apply(model, "random", keep_ratio=0.25):
            assert torch.equal(other(**inputs).logits, ref)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["divprune", "pdrop"])
def test_hand_written_decode_loop_matches_generate(tiny, family, method):
    """A loop that passes no position_ids gets the original numbering (cache length + dropped tokens)."""
    model, proc = tiny(family)
    inputs = batch_inputs(family, proc, (1, 2))
    with tokprune.apply(model, method, keep_ratio=0.25), torch.no_grad():
        gen = model.generate(
            **inputs,
            max_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        out = model(**inputs, position_ids=original_positions(model, inputs), use_cache=True)
        past, mask = output_cache(out), inputs["attention_mask"]
        token = gen.sequences[:, inputs["input_ids"].shape[1]][:, None]
        torch.testing.assert_close(out.logits[:, -1], gen.logits[0], atol=1e-5, rtol=0)
        for step in range(1, 3):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            step_out = model(input_ids=token, attention_mask=mask, use_cache=True, **{CACHE_KWARG: past})
            torch.testing.assert_close(step_out.logits[:, -1], gen.logits[step], atol=1e-5, rtol=0)
            past = output_cache(step_out)
            token = gen.sequences[:, inputs["input_ids"].shape[1] + step][:, None]


def test_budget_is_per_image(tiny):
    model, proc = tiny("qwen2_5_vl")
    inputs = batch_inputs("qwen2_5_vl", proc, (2, 1))
    with tokprune.apply(model, "fastervlm", budget=5) as pruner, torch.no_grad():
        model(**inputs)
    images_per_row = [2, 1]
    assert pruner.stats.visual_kept == [5 * n for n in images_per_row]


def test_stats_describe_last_prefill_and_survive_remove(tiny):
    model, proc = tiny("llava")
    inputs = batch_inputs("llava", proc, (1, 2))
    pruner = tokprune.apply(model, "pdrop", keep_ratio=0.125)
    with torch.no_grad():
        model(**inputs)
    stats = pruner.stats
    pruner.remove()
    assert pruner.stats is stats
    assert [s.where for s in stats.stages] == ["llm@1", "llm@2", "llm@3"]
    assert stats.visual_in == [49, 98]
    assert stats.visual_kept == [7, 14]
    assert stats.kept[0].dtype == torch.long and stats.kept[0].numel() == 7
    assert stats.scoring_seconds > 0
    assert stats.layer_averaged_visual(0) == pytest.approx((49 + 25 + 13 + 7) / 4)
    pruner.remove()  # idempotent


def test_static_cache_is_rejected(tiny):
    from transformers import StaticCache

    model, proc = tiny("llava")
    inputs = batch_inputs("llava", proc, (1, 1))
    cache = StaticCache(config=model.config.text_config, max_cache_len=256)
    with tokprune.apply(model, "random"), pytest.raises(errors.UnsupportedInputError, match="StaticCache"):
        model(**inputs, **{CACHE_KWARG: cache})


def test_custom_attention_without_a_mask_function_is_refused(tiny):
    """An attention function registered without a mask function gets no mask from transformers: pruned
    (left-padded) batches would silently attend to padding. tokprune refuses it until a mask is registered,
    and then prunes as under sdpa; a text-only prompt passes through meanwhile."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    name = "tokprune_test_sdpa"
    AttentionInterface.register(name, sdpa_attention_forward)
    model, proc = BUILDERS["llava"]("sdpa")
    reference, _ = tiny("llava")
    inputs = batch_inputs("llava", proc, (1, 2))
    try:
        model.set_attn_implementation({"text_config": name})
        text = proc.tokenizer(["USER: hello ASSISTANT:"], return_tensors="pt")
        with tokprune.apply(model, "divprune", keep_ratio=0.25), torch.no_grad():
            model(**text)
            with pytest.raises(errors.UnsupportedModelError, match="AttentionMaskInterface.register"):
                model(**inputs)
        AttentionMaskInterface.register(name, sdpa_mask)
        with tokprune.apply(model, "divprune", keep_ratio=0.25), torch.no_grad():
            got = model(**inputs).logits[:, -1]
        with tokprune.apply(reference, "divprune", keep_ratio=0.25), torch.no_grad():
            expected = reference(**inputs).logits[:, -1]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    finally:
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def test_compose_pre_then_llm(tiny):
    model, proc = tiny("llava")
    inputs = batch_inputs("llava", proc, (1, 2))
    with tokprune.apply(model, ["visionzip", "fastv"], keep_ratio=0.5) as pruner, torch.no_grad():
        model(**inputs)
    stages = pruner.stats.stages
    assert [s.where for s in stages] == ["pre", "llm@2"]
    # visionzip keeps its default 64 >= 49 (nothing), then fastv halves the tokens entering the LLM
    assert stages[0].visual_kept == [49, 98]
    assert stages[1].visual_kept == [25, 50]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("method", ["visionzip", "pdrop"])
def test_beams_and_return_sequences_prune_every_copy_alike(tiny, family, method):
    """generate() encodes images once, then repeats rows: the ViT signals must follow the copies."""
    model, proc = tiny(family)
    inputs = batch_inputs(family, proc, (1, 2))
    with tokprune.apply(model, method, keep_ratio=0.25) as pruner, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False,
                             pad_token_id=0)  # fmt: skip
        expanded = pruner.stats.kept
        model(**inputs)
        single = pruner.stats.kept
    assert out.shape[0] == 4
    for row in range(2):
        for copy in range(2):
            assert torch.equal(expanded[2 * row + copy], single[row])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_generate_without_cache_reuses_the_image_signals(tiny, family):
    """use_cache=False re-runs full forwards on pre-encoded images: every step prunes the same way."""
    model, proc = tiny(family)
    inputs = batch_inputs(family, proc, (1, 2))
    with tokprune.apply(model, "visionzip", keep_ratio=0.25) as pruner, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
        last_step = pruner.stats.kept
        model(**inputs)
    assert all(torch.equal(a, b) for a, b in zip(last_step, pruner.stats.kept))
    assert "get_image_features" not in model.model.__dict__  # instance wrappers are gone after remove()


def test_bfloat16_model_runs(tiny):
    from tiny_models import tiny_qwen25vl

    model, proc = tiny_qwen25vl()
    model = model.to(torch.bfloat16)
    inputs = batch_inputs("qwen2_5_vl", proc, (1, 2))
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    for method in ("visionzip", "divprune", ("dart", {"quota": "exact"})):  # exact: DART's own quota differs
        with tokprune.apply(model, method, keep_ratio=0.25) as pruner, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert out.shape[0] == 2 and pruner.stats.visual_kept == [4, 10]


def test_vision_layer_out_of_range_is_an_early_error(tiny):
    model, _ = tiny("llava")  # a 3-layer vision tower: VTC-CLS's default layers -4 .. -2 do not exist
    hooks_before = _hook_count(model)
    with pytest.raises(errors.MethodOptionError, match="vision tower has 3 layers"):
        tokprune.apply(model, "vtc_cls")
    assert not hasattr(model, "_tokprune_pruner")
    assert _hook_count(model) == hooks_before  # nothing half-installed


def _hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + ("get_image_features" in m.__dict__)
        for m in model.modules()
    )


def test_readme_tables_list_every_method_and_model():
    from pathlib import Path

    from tokprune.methods import REGISTRY, catalogue

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for entry in catalogue():
        row = f"| `{entry['name']}` | {entry['family']} | {entry['acts']} |"
        assert row in readme, f"README's method table lacks {row} (the registry's name, family and place)"
        line = next(line for line in readme.splitlines() if line.startswith(row))
        cells = line.split(
            " | "
        )  # name | family | acts | score / rule | default | agrees with the code | paper
        assert len(cells) == 7, f"README's row for {entry['name']} has {len(cells)} columns, not 7"
        default = cells[4]
        assert default.startswith(f"`{entry['default']}`"), (
            f"README's default for {entry['name']} is {default!r}, the catalogue's is {entry['default']!r}"
        )
        cls = REGISTRY[entry["name"]]
        agrees = cells[5]
        assert ("no released code" in agrees) == (
            not cls.code_families and entry["name"] in ("random", "pool")
        ), f"README's agreement cell for {entry['name']}: {agrees!r}"
        assert "@" in agrees or "no released code" in agrees, (
            f"{entry['name']}: name the commit compared against"
        )
    for name in tokprune.available_models():
        assert f"| `{name}` |" in readme, f"README's model table lacks {name}"


def test_a_patched_model_cannot_be_copied_or_pickled():
    """A deep copy would keep hooks and generate() wrappers bound to the original model (its generate()
    would run the original): refused, as is pickling; after remove() both work."""
    import copy
    import pickle

    model, _ = BUILDERS["llava"](
        "sdpa"
    )  # a fresh one: a forward may leave transformers' own (unpicklable) hooks
    pruner = tokprune.apply(model, "fastv", keep_ratio=0.25)
    with pytest.raises(errors.PatchedModelError, match="cannot be copied or pickled.*before tokprune.apply"):
        copy.deepcopy(model)
    with pytest.raises(errors.PatchedModelError, match="cannot be copied or pickled"):
        pickle.dumps(model)
    assert model.state_dict().keys()  # unaffected
    pruner.remove()
    twin = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    assert not hasattr(twin, "_tokprune_pruner") and not {"generate", "__reduce_ex__"} & set(twin.__dict__)


def test_model_families_name_the_family_of_every_class(tiny, capsys):
    """available_models() lists class names; model_families() maps each to its family, and `tokprune models`
    prints both on one line."""
    from tokprune.patches import adapter_for

    from tokprune import cli

    families = tokprune.model_families()
    assert list(families) == tokprune.available_models()
    assert families["Qwen3VLMoeForConditionalGeneration"] == families["Qwen3VLForConditionalGeneration"]
    for family in ("llava", "qwen2_5_vl", "idefics3"):
        model, _ = tiny(family)
        assert families[type(model).__name__] == adapter_for(model).family
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, family in families.items():
        assert any(line.split() == [name, family] for line in lines), (name, family)


@pytest.mark.parametrize("video_budget", ["frames", "per clip", None, 1, ""])
def test_video_budget_must_be_frame_or_clip(tiny, video_budget):
    model, _ = tiny("qwen2_vl")
    with pytest.raises(errors.BudgetError, match="video_budget must be 'frame'.*or 'clip'") as info:
        tokprune.apply(model, "random", budget=4, video_budget=video_budget)
    assert isinstance(info.value, ValueError)
    assert not hasattr(model, "_tokprune_pruner")


def test_clip_budget_is_refused_where_frames_are_images(tiny):
    """InternVL and SmolVLM receive a video as separate images: a budget per clip cannot be kept there.
    Idefics3 (same adapter, no video input) and the families with clips accept it."""
    for family in ("internvl", "smolvlm"):
        model, _ = tiny(family)
        with pytest.raises(errors.UnsupportedModelError, match="separate images.*video_budget='frame'"):
            tokprune.apply(model, "random", budget=4, video_budget="clip")
        assert not hasattr(model, "_tokprune_pruner")
        tokprune.apply(model, "random", budget=4, video_budget="frame").remove()
    for family in ("idefics3", "qwen2_vl", "llava_onevision", "llava"):
        model, _ = tiny(family)
        pruner = tokprune.apply(model, "random", budget=4, video_budget="clip")
        assert all(b.video == "clip" for b in pruner.budgets)
        pruner.remove()


def test_budgets_count_clips_as_asked_at_every_stage(tiny):
    """video_budget reaches every installed stage's budget (a multi-stage method's earlier stages too)."""
    model, _ = tiny("qwen2_vl")
    for video_budget in ("frame", "clip"):
        with tokprune.apply(model, ["visionzip", "fastv"], budget=4, video_budget=video_budget) as pruner:
            assert [b.video for b in pruner.budgets] == [video_budget] * 2
        mustdrop = ("mustdrop", {"vision_factor": 2})  # a vision stage at twice the final count
        with tokprune.apply(model, [mustdrop], budget=4, video_budget=video_budget) as pruner:
            assert [b.video for b in pruner.budgets] == [video_budget] * 2
            assert pruner.budgets[0].final.video == video_budget  # the earlier stage follows the final one


# ------------------------------------------------------------------------------ reproduction mode
def test_reproduction_mode_bad_values_and_families_are_refused(tiny):
    """order / positions outside their choices, a family the method's code does not run on, a method with no
    released code: a ReproductionError naming what to do, and nothing installed."""
    llava, _ = tiny("llava")
    gemma, _ = tiny("gemma3")
    hooks = _hook_count(llava)
    cases = [
        (llava, "visionzip", {"order": "code"}, r"order must be one of 'original', 'selection'"),
        (
            llava,
            "visionzip",
            {"positions": "renumbered"},
            r"positions must be one of 'original', 'contiguous'",
        ),
        (
            gemma,
            "visionzip",
            {"order": "selection"},
            r"runs on the model families llava, llava_next, not on gemma3",
        ),
        (llava, "random", {"positions": "contiguous"}, r"none \(no released code\)"),
        (llava, "tome", {"positions": "contiguous"}, r"tome: .*no released code"),
        (llava, ["visionzip", ("pdrop", {"layers": (1, 2, 3)})], {"order": "selection"}, None),
    ]
    for model, method, mode, match in cases:
        if match is None:  # every method of a composition has code for the family: accepted
            tokprune.apply(model, method, **mode).remove()
            continue
        with pytest.raises(errors.ReproductionError, match=match):
            tokprune.apply(model, method, **mode)
        assert not hasattr(model, "_tokprune_pruner")
    assert _hook_count(llava) == hooks


def test_reproduction_mode_is_recorded_on_the_pruner(tiny):
    model, _ = tiny("llava")
    with tokprune.apply(model, "visionzip", order="selection", positions="contiguous") as pruner:
        assert (pruner.order, pruner.positions) == ("selection", "contiguous")
