"""The features before the projector ("features", "vit_cls"), which methods with `features == "vision"`
(VisionZip, PruMerge, PruMerge+ by default) see as `ImageTokens.embeds`, on every tiny family.

For every visual token the adapter gives one row of the projector's input, in the LLM's visual-token order
(masked_scatter order), and `Adapter.project` maps it to exactly the model's own LLM input for that token:
checked against an unpatched forward of the same batch (images of different sizes, several per row;
videos beside images on Qwen). The rows are taken where a method sees them: a recording method run by
the engine. Separator tokens (LLaVA-NeXT / OneVision `image_newline`) carry no feature row; they are left
out of the model's rows by their value (the model's own newline parameter).

LLaVA-OneVision projects before it pools video frames and before it downsamples large AnyRes mosaics;
such tokens are no projection of any row (the MLP does not commute with the bilinear mean): their rows are
the pooled projector input, and a merge there is projected from it (documented in the adapter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from test_video import LAYOUTS as VIDEO_LAYOUTS
from test_video import video_batch
from tiny_models import BUILDERS, batch_inputs
from tiny_onevision import VIDEO_LAYOUTS as ONEVISION_LAYOUTS
from tiny_onevision import rand_clip
from tokprune.patches import adapter_for

import tokprune
from tokprune.methods.base import ImageTokens, Method, Selection

FAMILIES = list(BUILDERS)
QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
WITH_CLS = ["llava", "llava_next", "internvl"]  # tiny towers with a [CLS] token (CLIP, InternViT)
# OneVision sizes that the packing only moves (112x168 is 2x3 tiles, downsampled under anyres_max_4)
SIZES = {"llava_onevision": ((112, 112), (56, 112))}
TOL = 1e-5  # relative to the largest |value| (float32 summation-order noise of a subset's matmul)


@dataclass
class Recorder(Method):
    """Sees the features before the projector; keeps the first k tokens and records what it saw."""

    name = "feature_recorder"
    features = "vision"
    wanted: tuple[str, ...] = ()
    seen: list[ImageTokens] = field(default_factory=list)

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.wanted

    def select(self, image: ImageTokens, k: int) -> Selection:
        self.seen.append(image)
        return Selection(keep=torch.arange(k, device=image.embeds.device))


def recorded(model, inputs: dict, wanted: tuple[str, ...] = ()) -> tuple[Recorder, torch.Tensor]:
    """(the recorder after one forward, its rows projected by the adapter (N_content, D))."""
    recorder = Recorder(wanted=wanted)
    with torch.no_grad(), tokprune.apply(model, recorder, keep_ratio=0.9):
        model(**inputs)
        projected = adapter_for(model).project(torch.cat([image.embeds for image in recorder.seen]))
    return recorder, projected


def llm_rows(model, inputs: dict) -> torch.Tensor:
    """(N_content, D) the unpatched model's LLM input at its visual positions (row-major), separators left out."""
    embeds = lm_input(model, inputs)
    ids, cfg = inputs["input_ids"], model.config
    visual = ids == cfg.image_token_id  # and the video placeholders (Qwen), in one row-major order
    if getattr(cfg, "video_token_id", None) is not None:
        visual |= ids == cfg.video_token_id
    rows = embeds[visual]
    newline = getattr(model.model, "image_newline", None)
    return rows if newline is None else rows[~(rows == newline).all(-1)]


def assert_reproduces(model, inputs: dict) -> None:
    expected = llm_rows(model, inputs)
    _, projected = recorded(model, inputs)
    assert projected.shape == expected.shape
    scale = float(expected.abs().max())
    torch.testing.assert_close(projected, expected, rtol=0, atol=TOL * scale)


@pytest.mark.parametrize("layout", [(1, 2), (2, 1)])
@pytest.mark.parametrize("family", FAMILIES)
def test_project_of_feature_rows_is_the_llm_input(tiny, family, layout):
    """Images of different sizes (tilings, grids), several per row, left-padded rows."""
    model, proc = tiny(family)
    assert "features" in adapter_for(model).feature_signals
    kwargs = {"sizes": SIZES[family]} if family in SIZES else {}
    assert_reproduces(model, batch_inputs(family, proc, layout, **kwargs))


@pytest.mark.parametrize("layout", list(VIDEO_LAYOUTS))
@pytest.mark.parametrize("family", QWEN)
def test_qwen_videos_beside_images(tiny, family, layout):
    """Qwen: videos and images in sequence order (neither kind's own); Qwen2.5-VL's window order undone."""
    model, proc = tiny(family)
    inputs, _ = video_batch("qwen3_vl" if family.startswith("qwen3") else family, proc, VIDEO_LAYOUTS[layout])
    assert_reproduces(model, inputs)


def test_onevision_several_images_per_prompt(tiny):
    """Several-image prompts: base views only, each followed by one newline; a one-image row beside."""
    model, proc = tiny("llava_onevision")
    images = [[_image(112, 168, 0), _image(112, 112, 1)], [_image(56, 112, 2)]]
    texts = [
        "USER: <image> <image> describe the image ASSISTANT:",
        "USER: <image> w1 w2 w3 describe ASSISTANT:",
    ]
    inputs = dict(proc(text=texts, images=images, return_tensors="pt", padding=True))
    assert inputs["batch_num_images"].tolist() == [2, 1]
    assert_reproduces(model, inputs)


def onevision_videos(proc) -> dict:
    """Videos beside images the packing only moves (tiny_onevision's "mixed" prompts, smaller images)."""
    texts = ONEVISION_LAYOUTS["mixed"][0]
    images = [_image(112, 112, 0), _image(56, 112, 1)]
    videos = [rand_clip(3, seed) for seed in range(2)]
    return dict(proc(text=texts, images=images, videos=videos, return_tensors="pt", padding=True))


def _image(height: int, width: int, seed: int):
    from tiny_models import rand_image

    return rand_image(height, width, seed)


@pytest.mark.parametrize("method", ["visionzip", "prumerge", "prumerge_plus"])
def test_onevision_merges_pooled_tokens_from_their_pooled_features(tiny, monkeypatch, method):
    """A 112x168 image (2x3 tiles > 1.1 x anyres_max_4) is downsampled after the projector, a video frame
    pooled: a merging method on the features runs, every LLM row it rewrote is the projector's output on
    the merged (pooled) feature row, and every other row is the model's own."""
    from tokprune.patches.llava_onevision import LlavaOnevisionAdapter

    model, proc = tiny("llava_onevision")
    made = []
    original = LlavaOnevisionAdapter.project

    def project(self, rows):
        out = original(self, rows)
        made.append(out.detach())
        return out

    monkeypatch.setattr(LlavaOnevisionAdapter, "project", project)
    for inputs in (batch_inputs("llava_onevision", proc, (1, 1)), onevision_videos(proc)):
        made.clear()
        full = lm_input(model, inputs).flatten(0, 1)
        with tokprune.apply(model, method, keep_ratio=0.25):
            pruned = lm_input(model, inputs).flatten(0, 1)
        assert made, "the merged rows go through the projector"
        projected = torch.cat(made)
        own = (pruned[:, None] == full[None]).all(-1).any(1)
        new = (pruned[:, None] == projected[None]).all(-1).any(1)
        assert bool((own | new).all()) and bool(new.any())


def test_onevision_drops_without_merging_on_downsampled_mosaics_and_videos(tiny):
    """VisionZip without contextual tokens nor [CLS] only drops: the kept tokens keep their LLM input."""
    model, proc = tiny("llava_onevision")
    for inputs in (batch_inputs("llava_onevision", proc, (1, 1)), onevision_videos(proc)):
        full = lm_input(model, inputs).flatten(0, 1)
        options = dict(keep_ratio=0.25, contextual_ratio=0.0, cls_token=False)
        with tokprune.apply(model, "visionzip", **options) as pruner:
            pruned = lm_input(model, inputs).flatten(0, 1)
        assert pruned.shape[0] < full.shape[0] and sum(pruner.stats.visual_kept) > 0
        assert bool((pruned[:, None] == full[None]).all(-1).any(1).all())  # no row is new


def lm_input(model, inputs: dict) -> torch.Tensor:
    """(B, L', D) the language model's input embeddings of one forward."""
    got = {}
    hook = adapter_for(model).language_model.register_forward_pre_hook(
        lambda module, args, kwargs: got.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return got["embeds"]


def test_onevision_other_methods_unaffected(tiny):
    """Methods on the LLM input run on the same inputs."""
    model, proc = tiny("llava_onevision")
    with tokprune.apply(model, "divprune", keep_ratio=0.25), torch.no_grad():
        model(**batch_inputs("llava_onevision", proc, (1, 1)))
        model(**onevision_videos(proc))


# ------------------------------------------------------------------------------------------------ vit_cls


def tower_cls(model, inputs: dict, family: str) -> torch.Tensor:
    """(N_content, C_projector) every LLM token's tile [CLS] at the feature layer, from the tower's own
    hidden states, in the projector input's space."""
    inner = model.model
    with torch.no_grad():
        if family == "internvl":
            hidden = inner.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state  # layer -1
            tokens = (hidden.shape[1] - 1) // 4  # the 2x2 pixel shuffle
            return hidden[:, :1].repeat(1, tokens, 4).flatten(0, 1)  # 4 copies side by side
        pixels = inputs["pixel_values"]
        if family == "llava_next":
            n_tiles = [int(n) for n in _next_tiles(model, inputs)]
            pixels = torch.cat([p[:n] for p, n in zip(pixels, n_tiles)])
        states = inner.vision_tower(pixels, output_hidden_states=True).hidden_states
        hidden = states[model.config.vision_feature_layer]
        cls = hidden[:, :1].expand(-1, hidden.shape[1] - 1, -1)  # on every patch of its tile
        if family == "llava":
            return cls.flatten(0, 1)
        packed, _ = inner.pack_image_features(
            list(torch.split(cls, n_tiles)), inputs["image_sizes"], "default", image_newline=None
        )
        return torch.cat(packed)


def _next_tiles(model, inputs: dict) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    return [
        image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for size in inputs["image_sizes"]
    ]


@pytest.mark.parametrize("family", WITH_CLS)
def test_vit_cls_is_the_tiles_cls_token(tiny, family):
    model, proc = tiny(family)
    inputs = batch_inputs(family, proc, (1, 2))
    recorder, _ = recorded(model, inputs, ("vit_cls",))
    got = torch.cat([image.signals["vit_cls"] for image in recorder.seen])
    expected = tower_cls(model, inputs, family)
    assert got.shape == expected.shape == torch.cat([image.embeds for image in recorder.seen]).shape
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL * float(expected.abs().max()))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in WITH_CLS])
def test_no_vit_cls_without_a_cls_token(tiny, family):
    """SigLIP, Qwen's ViT: no [CLS], so no "vit_cls" (VisionZip then takes all its tokens from patches)."""
    model, proc = tiny(family)
    kwargs = {"sizes": SIZES[family]} if family in SIZES else {}
    recorder, _ = recorded(model, batch_inputs(family, proc, (1, 1), **kwargs), ("vit_cls",))
    assert recorder.seen and all("vit_cls" not in image.signals for image in recorder.seen)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl", "gemma3"])
def test_bfloat16_features_keep_their_dtype(family):
    """The rows reach the method in the model's dtype and a merging method projects them (no float32 leak,
    e.g. through LLaVA-OneVision's packing of the signals)."""
    model, proc = BUILDERS[family]("sdpa")
    model = model.to(torch.bfloat16)
    kwargs = {"sizes": SIZES[family]} if family in SIZES else {}
    inputs = batch_inputs(family, proc, (1, 1), **kwargs)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    recorder, projected = recorded(model, inputs)
    assert all(image.embeds.dtype == torch.bfloat16 for image in recorder.seen)
    assert projected.dtype == torch.bfloat16
    with tokprune.apply(model, "visionzip", keep_ratio=0.25), torch.no_grad():
        model(**inputs)
