"""Inputs of the reference-agreement suite (issue 19): tiny models of the real classes at the real token grids,
the tensors the authors' code reads from the *unpatched* model (eager attention maps, q/k/v projections,
hidden states, projector inputs), and what tokprune did on the same inputs.

A reference (`tests/agreement/ref_<method>.py`) re-implements an official selection from the tensors of a
`VisionCapture` / the model's own modules; its test compares the result with `run_tokprune` on the same
`Case`. Kept sets are compared as sets of *vision-tower token indices*: 0 is the [CLS] token of a CLIP tower
and patch p of a 24 x 24 grid is 1 + p, as the authors' LLaVA code indexes `hidden_states` (helpers
`patch_tokens` / `vit_tokens` convert).

The models are random but not uniform: the ViT's q/k weights are scaled up (`SHARPEN`) so that [CLS]
attention rows have clear maxima, as a trained CLIP's do, and top-k choices are not decided by float noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tiny_models import _text_config

import tokprune
from tokprune.bench.synthetic import llava_processor, make_tokenizer, rand_image

SHARPEN = 4.0  # factor on the ViT's q_proj / k_proj weights (attention logits grow by its square)
PROMPT = "USER: <image> describe the image please and w1 w2 w3 ASSISTANT:"


def _sharpen(vision_tower: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in vision_tower.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(SHARPEN)


def _clip_config(image_size: int, patch: int, layers: int, tower: str):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    dims = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch,
    )  # fmt: skip
    if tower == "clip":
        return CLIPVisionConfig(**dims, projection_dim=64)
    return SiglipVisionConfig(**dims, vision_use_head=False)


def agreement_llava(grid: int = 24, patch: int = 4, layers: int = 6, tower: str = "clip", seed: int = 0):
    """LlavaForConditionalGeneration at LLaVA-1.5's token grid (24 x 24 = 576 patches; a CLIP tower with
    [CLS], feature layer -2, strategy "default"), or tower="siglip" (no [CLS], feature layer -1, "full";
    grid 27 gives SigLIP's 729). Returns (model, processor), eager attention everywhere."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tok = make_tokenizer(["<image>"])
    clip = tower == "clip"
    cfg = LlavaConfig(
        vision_config=_clip_config(grid * patch, patch, layers, tower),
        text_config=LlamaConfig(**_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=grid * grid,
        vision_feature_layer=-2 if clip else -1,
        vision_feature_select_strategy="default" if clip else "full",
    )
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    _sharpen(model.model.vision_tower)
    return model, llava_processor(tok, grid * patch, patch, cls=clip)


def agreement_llava_next(grid: int = 24, patch: int = 4, layers: int = 6, seed: int = 0):
    """LlavaNextForConditionalGeneration with LLaVA-NeXT's tile grid (24 x 24 per tile, CLIP with [CLS],
    feature layer -2, "default") and pinpoints 1x2, 2x1, 2x2 tiles. Returns (model, processor), eager."""
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    torch.manual_seed(seed)
    tok = make_tokenizer(["<image>"])
    side = grid * patch
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    cfg = LlavaNextConfig(
        vision_config=_clip_config(side, patch, layers, "clip"), text_config=LlamaConfig(**_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=grid * grid,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    model = LlavaNextForConditionalGeneration(cfg).eval()
    _sharpen(model.model.vision_tower)
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
    )
    proc = LlavaNextProcessor(
        image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )  # fmt: skip
    return model, proc


@dataclass
class VisionCapture:
    """What the unpatched vision tower computed for the prompt's images (or AnyRes tiles, in the order the
    model runs them), eager attention. n = images/tiles, T = tokens per image ([CLS] first on CLIP), C width.

    hidden_states[i]: (n, T, C); [0] the embeddings, [i] the output of encoder layer i - 1 (HF's and the
        authors' code's `hidden_states` indexing, so [-2] is LLaVA's feature layer).
    attentions[i]: (n, H, T, T) the post-softmax map of encoder layer i.
    queries[i] / keys[i] / values[i]: (n, T, C) outputs of layer i's q_proj / k_proj / v_proj (q unscaled;
        inputs were layer_norm1 of hidden_states[i]).
    features: (n, P, C) what the multi-modal projector received (feature layer, select strategy applied).
    scale: the attention's scaling (head_dim ** -0.5); heads: H.
    """

    hidden_states: tuple[torch.Tensor, ...]
    attentions: tuple[torch.Tensor, ...]
    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    features: torch.Tensor
    scale: float
    heads: int


@dataclass
class Case:
    """One prompt on one model: the processor's inputs and what the unpatched model computed."""

    model: torch.nn.Module
    processor: object
    inputs: dict
    vision: VisionCapture
    lm_input: torch.Tensor  # (B, L, D) inputs_embeds the language model received (unpruned)
    visual: torch.Tensor  # (B, L) bool image-token positions
    logits: torch.Tensor  # (B, L, V) the unpatched model's prefill logits
    extra: dict = field(default_factory=dict)

    @property
    def grid(self) -> int:
        """Side of a tile's / image's patch grid."""
        cfg = self.model.config.vision_config
        return cfg.image_size // cfg.patch_size


def _encoder_layers(model) -> torch.nn.ModuleList:
    tower = model.model.vision_tower
    return (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers


@torch.no_grad()
def capture(model, inputs: dict) -> tuple[VisionCapture, torch.Tensor, torch.Tensor]:
    """Run the unpatched model once (eager) and record the vision tower's tensors, the LLM input and the
    logits. Returns (VisionCapture, lm_input (B, L, D), logits (B, L, V))."""
    layers = _encoder_layers(model)
    got: dict = {"q": {}, "k": {}, "v": {}}
    handles = []

    def tower_pre(module, args, kwargs):
        kwargs.update(output_attentions=True, output_hidden_states=True)
        return args, kwargs

    def tower_post(module, args, kwargs, output):
        got["hidden"], got["attn"] = output.hidden_states, output.attentions

    def proj(kind, i):
        return lambda module, args, output: got[kind].__setitem__(i, output.detach().clone())

    def projector_pre(module, args):
        got["features"] = args[0].detach().clone()

    def lm_pre(module, args, kwargs):
        got["lm_input"] = kwargs["inputs_embeds"].detach().clone()

    tower = model.model.vision_tower
    handles.append(tower.register_forward_pre_hook(tower_pre, with_kwargs=True))
    handles.append(tower.register_forward_hook(tower_post, with_kwargs=True))
    for i, layer in enumerate(layers):
        for kind in "qkv":
            handles.append(getattr(layer.self_attn, f"{kind}_proj").register_forward_hook(proj(kind, i)))
    handles.append(model.model.multi_modal_projector.register_forward_pre_hook(projector_pre))
    handles.append(model.model.language_model.register_forward_pre_hook(lm_pre, with_kwargs=True))
    try:
        logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    attention = layers[0].self_attn
    vision = VisionCapture(
        hidden_states=tuple(h.detach().clone() for h in got["hidden"]),
        attentions=tuple(a.detach().clone() for a in got["attn"]),
        queries=[got["q"][i] for i in range(len(layers))],
        keys=[got["k"][i] for i in range(len(layers))],
        values=[got["v"][i] for i in range(len(layers))],
        features=got["features"],
        scale=attention.scale,
        heads=attention.num_heads,
    )
    return vision, got["lm_input"], logits


def llava_case(seed: int = 0, n_images: int = 1, model_and_processor=None, prompt: str = PROMPT) -> Case:
    """A one-row LLaVA-1.5 prompt with `n_images` random images (seeds from `seed`)."""
    model, proc = model_and_processor or agreement_llava()
    text = prompt.replace("<image>", " ".join(["<image>"] * n_images))
    side = model.config.vision_config.image_size
    images = [rand_image(side, side, seed + i) for i in range(n_images)]
    inputs = dict(proc(text=[text], images=images, return_tensors="pt"))
    return _case(model, proc, inputs)


def llava_next_case(size: tuple[int, int] = (192, 192), seed: int = 0, model_and_processor=None) -> Case:
    """A one-row LLaVA-NeXT prompt with one random image of `size` (H, W): (192, 192) gives the base view and
    2 x 2 full tiles with nothing unpadded (the aspect ratio of the tile mosaic), (96, 192) 1 x 2."""
    model, proc = model_and_processor or agreement_llava_next()
    inputs = dict(proc(text=[PROMPT], images=[rand_image(*size, seed)], return_tensors="pt"))
    return _case(model, proc, inputs)


_MODELS: dict = {}
_CASES: dict = {}


def shared_model(kind: str):
    """(model, processor) built once per test session: "llava" (`agreement_llava()`) or "next"
    (`agreement_llava_next()`). The agreement tests never change weights, so they may share them."""
    if kind not in _MODELS:
        _MODELS[kind] = agreement_llava() if kind == "llava" else agreement_llava_next()
    return _MODELS[kind]


def cached_case(kind: str, seed: int) -> Case:
    """The shared cases, each built once per session: "llava" (one 24 x 24 image of seed `seed`) or "next"
    (192 x 192: base view and 2 x 2 tiles, nothing unpadded)."""
    if (kind, seed) not in _CASES:
        mp = shared_model(kind)
        _CASES[kind, seed] = (
            llava_case(seed, model_and_processor=mp)
            if kind == "llava"
            else llava_next_case((192, 192), seed=seed, model_and_processor=mp)
        )
    return _CASES[kind, seed]


def _case(model, proc, inputs: dict) -> Case:
    vision, lm_input, logits = capture(model, inputs)
    visual = inputs["input_ids"] == model.config.image_token_id
    return Case(model, proc, inputs, vision, lm_input, visual, logits)


@dataclass
class Run:
    """What tokprune did on a case. kept[i]: sorted LongTensor of image i's kept visual-token indices (its
    placeholder order); order[i]: the same indices in the order the LLM received them; lm_visual[i]: (k, D)
    the LLM input at those tokens, in that order; logits: (B, L', V)."""

    stats: object
    kept: list[torch.Tensor]
    order: list[torch.Tensor]
    lm_visual: list[torch.Tensor]
    lm_input: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def run_tokprune(case: Case, method, attn: str = "sdpa", **apply_kwargs) -> Run:
    """tokprune.apply(case.model, method, **apply_kwargs) on the case's inputs (the model switched to `attn`,
    then back to eager). Single-row cases: kept / order / lm_visual are per image of row 0."""
    model = case.model
    model.set_attn_implementation(attn)
    got = {}

    def lm_pre(module, args, kwargs):
        got["lm_input"] = kwargs["inputs_embeds"].detach().clone()

    try:
        with tokprune.apply(model, method, **apply_kwargs) as pruner:
            handle = model.model.language_model.register_forward_pre_hook(lm_pre, with_kwargs=True)
            try:
                logits = model(**case.inputs).logits
            finally:
                handle.remove()
            stats = pruner.stats
    finally:
        model.set_attn_implementation("eager")
    counts = case.visual.sum(1).tolist()
    assert len(counts) == 1, "run_tokprune reads row 0 only"
    kept_row = stats.kept[0]
    order_row, slots_row = stats.input_order[0], stats.input_slots[0]
    lm_row = got["lm_input"][0]
    n_images = _images_in_row(case)
    per_image = int(case.visual[0].sum()) // max(n_images, 1)
    kept, order, lm_visual = [], [], []
    for i in range(n_images):
        lo, hi = i * per_image, (i + 1) * per_image
        kept.append(kept_row[(kept_row >= lo) & (kept_row < hi)] - lo)
        in_image = (order_row >= lo) & (order_row < hi)
        order.append(order_row[in_image] - lo)
        lm_visual.append(lm_row[slots_row[in_image]])
    return Run(stats, kept, order, lm_visual, got["lm_input"], logits)


def _images_in_row(case: Case) -> int:
    """Images of row 0 (LLaVA-NeXT: one image of several tiles)."""
    return 1 if "image_sizes" in case.inputs else int(case.inputs["pixel_values"].shape[0])


def patch_tokens(vit_indices: torch.Tensor) -> torch.Tensor:
    """Vision-tower token indices ([CLS] = 0, patch p = 1 + p) -> patch indices (the [CLS] dropped)."""
    return vit_indices[vit_indices > 0] - 1


def vit_tokens(patch_indices: torch.Tensor, with_cls: bool = False) -> torch.Tensor:
    """Patch indices -> vision-tower token indices (patch p = 1 + p), with [CLS] (0) first if asked."""
    out = patch_indices + 1
    return torch.cat([out.new_zeros(1), out]) if with_cls else out


def jaccard(a, b) -> float:
    """|a ∩ b| / |a ∪ b| of two index collections (1.0 for two empty ones)."""
    a, b = set(torch.as_tensor(a).tolist()), set(torch.as_tensor(b).tolist())
    return len(a & b) / len(a | b) if a | b else 1.0


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected| (the embeddings' scale)."""
    got, expected = got.detach().float(), expected.detach().float()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
