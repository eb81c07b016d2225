"""The vLLM plugin's pieces that need no vLLM: the config entry and its refusals, the helper's overrides,
the signal layers of the tower hooks, the per-image split of the selection, the checkpoint renaming and
the torchvision guard. The plugin inside vLLM is tested in tests/vllm (`make test-vllm`)."""

from __future__ import annotations

import json

import pytest
import torch

from tokprune.core.budget import Budget
from tokprune.core.layout import ImageLayout
from tokprune.errors import BudgetError, ServingError, UnknownMethodError, UnsupportedModelError
from tokprune.methods import REGISTRY, make_method
from tokprune.methods.base import CompositeMethod
from tokprune.serving.vllm import ARCHITECTURES, overrides, servable_methods
from tokprune.serving.vllm.checkpoints import copy_in_hub_layout, hub_name
from tokprune.serving.vllm.plan import ServingPlan, check_vllm_version, plan_from_entry, plan_of
from tokprune.serving.vllm.select import pruned_embeddings
from tokprune.serving.vllm.torchvision_guard import guarded
from tokprune.serving.vllm.vision import signal_layers

LLAVA = "LlavaForConditionalGeneration"


# --- the entry -------------------------------------------------------------------------------------


def test_servable_methods_are_the_fixed_count_pre_llm_ones_without_text():
    names = servable_methods()
    assert {"visionzip", "divprune", "fastervlm", "tome", "random", "pool"} <= set(names)
    for name in names:
        cls = REGISTRY[name]
        assert cls.where == "pre" and not issubclass(cls, CompositeMethod) and not cls.needs_tiles
    # inside the LLM, prompt text: refused
    for name in ("fastv", "pdrop", "sparsevlm", "cdpruner"):
        if name in REGISTRY:
            assert name not in names


def test_a_plan_keeps_a_fixed_count_per_image():
    plan = plan_from_entry({"method": "visionzip", "budget": 64})
    assert (plan.kept(576), plan.kept(196), plan.kept(40)) == (64, 64, 40)
    ratio = plan_from_entry({"method": "divprune", "keep_ratio": 0.25})
    assert (ratio.kept(576), ratio.kept(196)) == (144, 49)


def test_entry_round_trips_through_the_normalised_form():
    plan = plan_from_entry({"method": "visionzip", "budget": 32, "order": "selection"})
    again = plan_from_entry(plan.entry())
    assert again.entry() == plan.entry()
    assert again.order == "selection" and again.budget == Budget(tokens=32)


def test_method_options_travel_in_the_entry():
    default = make_method("visionzip", {})
    field = next(f for f in ("dominant_ratio", "contextual_ratio", "merge_layer") if hasattr(default, f))
    value = getattr(default, field)
    changed = value / 2 if isinstance(value, float) else value - 1
    plan = plan_from_entry({"method": "visionzip", "budget": 32, "options": {field: changed}})
    assert getattr(plan.method, field) == changed
    assert plan.entry()["options"] == {field: changed}


@pytest.mark.parametrize(
    ("entry", "error", "match"),
    [
        ("visionzip", ServingError, "must be an object"),
        ({"budget": 64}, ServingError, "must be an object"),
        ({"method": "visionzip", "budget": 64, "layers": 3}, ServingError, "unknown key"),
        ({"method": "visionzip", "options": [1]}, ServingError, "'options' must be an object"),
        ({"method": "visionzipp", "budget": 64}, UnknownMethodError, "visionzip"),
        ({"method": "visionzip", "budget": 64, "order": "random"}, ServingError, "order must be one of"),
        ({"method": "visionzip", "budget": 0}, BudgetError, "positive int"),
        ({"method": "visionzip", "budget": 64, "keep_ratio": 0.5}, BudgetError, "not both"),
        ({"method": "fastv", "budget": 64}, ServingError, "inside the language model"),
    ],
)
def test_bad_entries_are_refused_with_the_reason(entry, error, match):
    with pytest.raises(error, match=match):
        plan_from_entry(entry)


def test_an_adaptive_default_count_is_refused_and_a_fixed_one_runs():
    with pytest.raises(ServingError, match="adaptive"):
        plan_from_entry({"method": "prumerge"})
    assert plan_from_entry({"method": "prumerge", "budget": 32}).kept(576) == 32


def test_a_method_that_reads_the_prompt_is_refused():
    texty = [n for n, c in REGISTRY.items() if c.where == "pre" and n not in servable_methods()]
    assert texty, "the registry has pre-LLM methods the plugin cannot serve (prompt text or tiles)"
    for name in texty:
        with pytest.raises(ServingError, match="prompt|tiles"):
            plan_from_entry({"method": name, "budget": 16})


def test_an_unknown_method_option_is_refused():
    with pytest.raises(Exception, match="no_such_option"):
        plan_from_entry({"method": "visionzip", "budget": 16, "options": {"no_such_option": 1}})


def test_plan_of_reads_the_config_entry_and_names_the_missing_one():
    class Config:
        tokprune = {"method": "tome", "budget": 8}

    assert plan_of(Config()).method.name == "tome"
    with pytest.raises(ServingError, match="hf_overrides"):
        plan_of(object())


@pytest.mark.parametrize("version", ["0.32", "0.32.0", "0.32.1+cpu"])
def test_the_tested_vllm_release_passes(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "0.320.0", "1.0.0"])
def test_other_vllm_releases_are_refused(version):
    with pytest.raises(ServingError, match="tested with vLLM 0.32"):
        check_vllm_version(version)


# --- the helper ------------------------------------------------------------------------------------


def test_overrides_name_tokprunes_architecture_and_the_entry(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [LLAVA]}))
    hf = overrides(tmp_path, "divprune", budget=16)
    assert hf["architectures"] == [ARCHITECTURES[LLAVA][0]]
    assert plan_from_entry(hf["tokprune"]).kept(576) == 16
    assert overrides(None, "divprune", budget=16, architecture=LLAVA) == hf


def test_overrides_refuse_an_unsupported_architecture_or_an_unreadable_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MllamaForConditionalGeneration"]}))
    with pytest.raises(UnsupportedModelError, match="does not support MllamaForConditionalGeneration"):
        overrides(tmp_path, "visionzip", budget=16)
    with pytest.raises(UnsupportedModelError, match="architecture="):
        overrides(tmp_path / "missing", "visionzip", budget=16)


def test_overrides_validate_the_method_before_any_architecture():
    with pytest.raises(ServingError, match="inside the language model"):
        overrides(None, "fastv", budget=16, architecture=LLAVA)


# --- the tower's signal layers ---------------------------------------------------------------------


def test_signal_layers_number_the_full_tower():
    by_layer = signal_layers(("cls_attention", "received_attention@3"), 24, 22, has_cls=True)
    assert by_layer[3] == {"received_attention@3": "received_attention"}
    assert "cls_attention" in by_layer[22]


def test_signal_layers_without_cls_use_what_each_patch_receives():
    by_layer = signal_layers(("cls_attention",), 27, 26, has_cls=False)
    assert all("cls_attention" not in w.values() for w in by_layer.values())


def test_signal_layers_refuse_a_signal_the_tower_cannot_give():
    with pytest.raises(ServingError, match="cannot give"):
        signal_layers(("llm_attention",), 24, 22, has_cls=True)


# --- the per-image split ---------------------------------------------------------------------------


def _layout(counts):
    side = [int(n**0.5) for n in counts]
    return ImageLayout(counts=list(counts), grids=[(s, s) for s in side])


def test_pruned_embeddings_give_each_image_its_k_rows_in_raster_order():
    counts = [16, 9]
    embeds = torch.randn(sum(counts), 8)
    plan = plan_from_entry({"method": "random", "budget": 4})
    out = pruned_embeddings(plan, embeds, _layout(counts), {})
    assert [o.shape for o in out] == [(4, 8), (4, 8)]
    for image, rows in zip((embeds[:16], embeds[16:]), out, strict=True):
        where = [int((image == r).all(1).nonzero()) for r in rows]
        assert where == sorted(where)  # kept rows of the image, in the image's order


def test_pruned_embeddings_keep_all_is_the_input():
    counts = [9, 4]
    embeds = torch.randn(13, 6)
    plan = plan_from_entry({"method": "random", "budget": 9})
    out = pruned_embeddings(plan, embeds, _layout(counts), {})
    assert torch.equal(torch.cat(out), embeds)


def test_pruned_embeddings_refuse_a_count_the_placeholders_do_not_hold():
    class Short(ServingPlan):
        def kept(self, n):  # the placeholders say one more than the method keeps
            return super().kept(n) + 1

    base = plan_from_entry({"method": "random", "budget": 4})
    with pytest.raises(RuntimeError, match="placeholders"):
        pruned_embeddings(Short(base.method, base.budget), torch.randn(16, 4), _layout([16]), {})


# --- checkpoints and torchvision ---------------------------------------------------------------------


def test_hub_name_nests_only_the_flat_tower():
    assert hub_name("vision_tower.encoder.layers.0.mlp.fc1.weight") == (
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    )
    nested = "vision_tower.vision_model.post_layernorm.weight"
    assert hub_name(nested) == nested
    assert hub_name("language_model.model.embed_tokens.weight") == "language_model.model.embed_tokens.weight"


def test_copy_in_hub_layout_renames_the_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    save_file({"vision_tower.embeddings.x": torch.ones(2), "lm_head.weight": torch.zeros(1)},
              source / "model.safetensors")  # fmt: skip
    target = copy_in_hub_layout(source, tmp_path / "dst")
    assert set(load_file(target / "model.safetensors")) == {
        "vision_tower.vision_model.embeddings.x",
        "lm_head.weight",
    }
    with pytest.raises(FileNotFoundError, match="config.json"):
        copy_in_hub_layout(tmp_path / "nothing", tmp_path / "x")


def test_torchvision_guard_guards_the_two_registrations_once():
    text = (
        '@torch.library.register_fake("torchvision::nms")\ndef meta_nms(): ...\n'
        '@torch.library.register_fake("torchvision::qnms")\ndef meta_qnms(): ...\n'
        '@torch.library.register_fake("torchvision::roi_align")\ndef meta_roi(): ...\n'
    )
    once = guarded(text)
    assert once.count("torchvision.extension._has_ops()") == 2
    assert '@torch.library.register_fake("torchvision::roi_align")\n' in once
    assert guarded(once) == once
    guarded_part = once.split('@torch.library.register_fake("torchvision::roi_align")')[0]
    namespace = {"torch": torch, "torchvision": _NoOps}
    exec(compile(guarded_part, "<guarded>", "exec"), namespace)  # valid, and inert without the ops
    assert callable(namespace["meta_nms"]) and callable(namespace["meta_qnms"])


class _NoOps:
    """torchvision without its compiled ops (the state the guard is for)."""

    class extension:
        @staticmethod
        def _has_ops() -> bool:
            return False
