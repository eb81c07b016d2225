"""The lmms-eval plugin's model arguments and registration, offline on CPU.

The loading keys of lmms-eval's own HF models reach `from_pretrained` (and the processor); method options
stay apart from them and are checked before any checkpoint is loaded; a model that cannot be built from
its model_args string raises a SystemExit (lmms-eval's CLI turns any Exception into exit status 0); the
packaged tasks are in lmms-eval's default task index and `tokprune` is in its model tables.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("TOKPRUNE_REQUIRE_EVAL"):
    import lmms_eval  # noqa: F401
else:
    pytest.importorskip("lmms_eval")

import lmms_eval.models  # noqa: E402  (its import runs the entry point)
from lmms_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from tokprune.errors import BudgetError, MethodOptionError, UnknownMethodError  # noqa: E402
from tokprune.eval import task_dir  # noqa: E402
from tokprune.eval.args import RESERVED, ModelArgsError, run_args  # noqa: E402
from tokprune.eval.lmms import ModelSetupExit, TokpruneSimple  # noqa: E402
from tokprune.eval.loading import check_processor_kwargs  # noqa: E402
from tokprune.methods import catalogue  # noqa: E402
from tokprune.toy.model import toy_config, toy_processor  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    """An untrained toy VLM saved as a checkpoint folder (LLaVA: a CLIP-style image processor)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    processor = toy_processor()
    path = tmp_path_factory.mktemp("toy")
    LlavaForConditionalGeneration(toy_config(processor)).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture
def calls(monkeypatch) -> dict[str, list[dict]]:
    """The keyword arguments of every model / processor `from_pretrained` call (the real loads run)."""
    import tokprune.toy.model

    seen: dict[str, list[dict]] = {"model": [], "processor": [], "toy": []}
    targets = (
        ("model", AutoModelForImageTextToText, "from_pretrained"),
        ("processor", AutoProcessor, "from_pretrained"),
        ("toy", tokprune.toy.model, "load_toy"),
    )
    for name, owner, attribute in targets:
        original = getattr(owner, attribute)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen[_name].append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, attribute, spy)
    return seen


def built():
    """(an untrained toy model, its processor), built in memory."""
    processor = toy_processor()
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration(toy_config(processor)).eval(), processor


# ----------------------------------------------------------------------------------------- the scheme
def test_no_method_option_has_a_reserved_name():
    """A bare key is a loading / run / pruning key exactly when it is reserved, so no method may define an
    option of that name (it could never be given); rename the option if this fails."""
    clashes = {e["name"]: sorted(set(e["options"]) & set(RESERVED)) for e in catalogue()}
    assert {name: keys for name, keys in clashes.items() if keys} == {}


def test_keys_are_split_into_loading_pruning_and_method_options():
    args = run_args(
        pretrained="toy", device_map="cpu", torch_dtype="bf16", revision=1234, trust_remote_code=False,
        method="visionzip", budget=16, contextual_ratio=0.25, batch_size=2, max_pixels=1003520,
    )  # fmt: skip
    assert (args.load.device_map, args.load.dtype, args.load.revision) == ("cpu", "bfloat16", "1234")
    assert args.load.processor_kwargs == {"max_pixels": 1003520} and args.batch_size == 2
    assert (args.prune.method_arg(), args.prune.budget) == ("visionzip", 16)
    assert args.prune.options == {"contextual_ratio": 0.25}
    composed = run_args(
        method="visionzip+fastv", keep_ratio=0.5, **{"fastv.layer": 3, "visionzip.budget": 64}
    )
    assert composed.prune.method_arg() == [("visionzip", {"budget": 64}), ("fastv", {"layer": 3})]
    assert composed.prune.options == {} and composed.prune.keep_ratio == 0.5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"method": "visionzip", "device_mapp": "cpu"},
            ModelArgsError,
            "device_mapp: neither a model argument",
        ),
        ({"method": "visionzip", "layer": 2}, ModelArgsError, r"nor an option of visionzip \(cls_token"),
        ({"method": "visionzip+fastv", "layer": 2}, ModelArgsError, "write each option as <method>.<option>"),
        ({"method": "visionzip", "fastv.layer": 2}, ModelArgsError, "fastv.layer: a scoped option"),
        ({"method": "visionzip+fastv", "fastv.nope": 2}, MethodOptionError, "fastv has no option nope"),
        ({"method": "visionzip+nope"}, UnknownMethodError, "unknown method 'nope'"),
        ({"method": "fastv", "budget": 0}, BudgetError, "budget must be a positive int"),
        ({"method": "visionzip+fastv", "budget": 8, "fastv.budget": 4}, ModelArgsError, "budget twice"),
        ({"method": "fastv", "video_budget": "movie"}, BudgetError, "video_budget must be"),
        ({"method": "fastv", "order": "random"}, ModelArgsError, "order must be one of original, selection"),
        ({"seed": 3}, ModelArgsError, "method options need method=<name>"),
        ({"dtype": "float16", "torch_dtype": "bfloat16"}, ModelArgsError, "disagree; give one of them"),
        ({"dtype": "float8"}, ModelArgsError, "dtype must be one of"),
        ({"device": "gpu0"}, ModelArgsError, "device must be a torch device"),
        ({"device": "cpu", "device_map": "cuda:0"}, ModelArgsError, "not both"),
        ({"trust_remote_code": "yes"}, ModelArgsError, "trust_remote_code must be true or false"),
        ({"max_pixels": -5}, ModelArgsError, "max_pixels must be a positive integer"),
    ],
)
def test_bad_model_args_fail_before_loading(calls, kwargs, error, match):
    with pytest.raises(error, match=match):
        TokpruneSimple(pretrained="toy", **kwargs)
    assert calls == {"model": [], "processor": [], "toy": []}


# ----------------------------------------------------------------------------------------- loading
def test_loading_keys_reach_from_pretrained(toy_dir, calls):
    lm = TokpruneSimple(
        pretrained=str(toy_dir), revision="main", device_map="cpu", torch_dtype="bfloat16",
        attn_implementation="eager", trust_remote_code=True, method="divprune", keep_ratio=0.25,
    )  # fmt: skip
    (model_kwargs,), (processor_kwargs,) = calls["model"], calls["processor"]
    assert model_kwargs == {
        "dtype": torch.bfloat16, "attn_implementation": "eager", "revision": "main",
        "trust_remote_code": True, "device_map": "cpu",
    }  # fmt: skip
    assert processor_kwargs == {"revision": "main", "trust_remote_code": True}
    model = lm.session.model
    assert model.dtype == torch.bfloat16 and model.config.text_config._attn_implementation == "eager"
    assert lm.session.device.type == "cpu"


def test_pixel_budgets_reach_the_processor_and_are_refused_where_ignored(toy_dir, calls):
    """min/max_pixels go to AutoProcessor (as lmms-eval's Qwen models pass them); a processor that does
    not resize by pixel count would ignore them silently, so that is an error before the model loads."""
    with pytest.raises(
        ModelArgsError, match="max_pixels, min_pixels would have no effect: LlavaImageProcessor"
    ):
        TokpruneSimple(pretrained=str(toy_dir), min_pixels=3136, max_pixels=200704)
    assert calls["processor"] == [{"min_pixels": 3136, "max_pixels": 200704}] and calls["model"] == []
    from types import SimpleNamespace

    from transformers import Qwen2VLImageProcessorPil

    qwen = SimpleNamespace(image_processor=Qwen2VLImageProcessorPil())
    check_processor_kwargs(qwen, {"min_pixels": 3136, "max_pixels": 200704})  # declared: accepted


def test_checkpoint_only_keys_are_refused_where_nothing_is_loaded():
    with pytest.raises(ModelArgsError, match="revision do not apply to pretrained=toy"):
        TokpruneSimple(pretrained="toy", revision="main")
    model, processor = built()
    with pytest.raises(ModelArgsError, match="device_map, max_pixels apply when loading a checkpoint"):
        TokpruneSimple(model=model, processor=processor, device_map="cpu", max_pixels=200704)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_cuda_fails_before_loading(calls):
    with pytest.raises(ModelArgsError, match="CUDA is not available here; use device=cpu"):
        TokpruneSimple(pretrained="toy", device="cuda")
    assert calls["toy"] == []


def test_toy_on_a_device_map_and_a_composition_with_scoped_options():
    lm = TokpruneSimple(pretrained="toy", device_map="cpu", method="visionzip+fastv", **{"fastv.layer": 1})
    assert lm.session.device.type == "cpu"
    with lm.session.pruning() as pruner:
        assert [m.name for m in pruner.methods] == ["visionzip", "fastv"] and pruner.methods[1].layer == 1


# ----------------------------------------------------------------------------------------- failing the run
def test_a_model_args_string_that_cannot_build_raises_system_exit(toy_dir):
    """lmms-eval's CLI catches every Exception of an evaluation and exits 0; a SystemExit gets through."""
    with pytest.raises(ModelSetupExit, match="device_mapp: neither a model argument") as raised:
        TokpruneSimple.create_from_arg_string(
            "pretrained=toy,method=visionzip,device_mapp=cpu", {"device": None}
        )
    assert isinstance(raised.value, SystemExit) and not isinstance(raised.value, Exception)
    assert isinstance(raised.value.__cause__, ModelArgsError)
    with pytest.raises(ModelSetupExit, match="cannot build the model") as raised:  # not a tokprune error
        TokpruneSimple.create_from_arg_string(f"pretrained={toy_dir / 'missing'}")
    assert isinstance(raised.value.__cause__, OSError)


# ----------------------------------------------------------------------------------------- registration
def test_default_task_index_includes_the_packaged_tasks(monkeypatch, tmp_path):
    """Every TaskManager with lmms-eval's default tasks also indexes task_dir() (scanned last, so a task
    of the same name in --include_path wins); one without the defaults does not. lmms-eval's own folder
    is stubbed out (scanning its ~2000 tasks takes long): the rest is the real TaskManager."""
    scanned: list[str] = []
    scan = TaskManager._get_task_and_group

    def fake_scan(self, folder):
        scanned.append(str(folder))
        return scan(self, folder) if not str(folder).startswith(os.path.dirname(lmms_eval.__file__)) else {}

    monkeypatch.setattr(TaskManager, "_get_task_and_group", fake_scan)
    assert TaskManager("WARNING").all_tasks == ["tokprune_toyvqa", "tokprune_toyvqa_mc"]
    assert scanned[-1] == str(task_dir()) and len(scanned) == 2
    (tmp_path / "mine.yaml").write_text("task: tokprune_toyvqa\ndataset_path: json\n")
    index = TaskManager("WARNING", include_path=str(tmp_path)).task_index
    assert index["tokprune_toyvqa"]["yaml_path"] == str(tmp_path / "mine.yaml")
    assert "tokprune_toyvqa_mc" in index
    assert TaskManager("WARNING", include_defaults=False).all_tasks == []


def test_tokprune_is_in_the_tables_lmms_eval_models_prints():
    assert lmms_eval.models.AVAILABLE_SIMPLE_MODELS["tokprune"] == "tokprune.eval.lmms.TokpruneSimple"
    assert lmms_eval.models.AVAILABLE_CHAT_TEMPLATE_MODELS["tokprune"] == "tokprune.eval.lmms.TokpruneChat"
    assert "tokprune" in lmms_eval.models.list_available_models()
