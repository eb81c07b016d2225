"""Random-weight models with the published shapes of real checkpoints, built offline, and their prompts.

`--layers N` truncates the language model to N decoder layers so that 7B shapes fit a CPU; the vision
tower is always complete. Weights are N(0, 0.02) with unit norms (softmaxes neither one-hot nor uniform);
timings are meaningful, selections and outputs are not.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the synthetic processors (Pillow) load when a preset is built, not listed
    import torch

PROMPT_WORDS = "describe the image please " * 8  # ~32 instruction tokens after the image
VICUNA_7B_LAYERS = 32
QWEN25_7B_LAYERS = 28


@dataclass
class Preset:
    """A named model shape: `build(layers, attn, dtype, device)` -> (model, make_inputs(batch_size)).

    model_class: the transformers class it builds (its tokprune adapter says what the model has, e.g.
    AnyRes tiles); llm_layers: the published checkpoint's LLM depth, the most `--layers` may keep. Both
    let a command check methods against the model before building it; "" / 0 = not stated.
    """

    name: str
    description: str
    build: Callable
    model_class: str = ""
    llm_layers: int = 0

    def depth(self, layers: int | None) -> int | None:
        """LLM layers of the model built with `--layers layers` (None = all of them); None where the preset
        does not state its depth. A ValueError that says the range where `layers` is outside
        [1, llm_layers]."""
        if not self.llm_layers:
            return layers
        if layers is None:
            return self.llm_layers
        if not 1 <= layers <= self.llm_layers:
            raise ValueError(
                f"--layers {layers}: {self.name}'s LLM has {self.llm_layers} layers and --layers keeps the "
                f"first N of them, N in [1, {self.llm_layers}]"
            )
        return layers


def _no_init_weights():
    """transformers' context manager that skips weight initialisation (its home moved across versions)."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(module).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def instantiate(model_cls, config, dtype: torch.dtype, device: torch.device, std: float = 0.02):
    """Build `model_cls(config)` on `device` in `dtype` without the slow default init, then N(0, std)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _no_init_weights(), device:
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif param.dim() == 1 and name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point() and not torch.isfinite(buffer).all():
                raise RuntimeError(f"buffer {name} was left uninitialised")
    return model.eval()


def _inputs_factory(
    processor, text: str, image_size: tuple[int, int], device: torch.device, dtype: torch.dtype
):
    from tokprune.bench.synthetic import rand_image

    def make_inputs(batch_size: int = 1) -> dict:
        images = [rand_image(*image_size, seed=i) for i in range(batch_size)]
        batch = processor(text=[text] * batch_size, images=images, return_tensors="pt", padding=True)
        return {
            k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            for k, v in batch.items()
        }

    return make_inputs


def _llama_text(layers: int, vocab: int, tok) -> dict:
    return dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers or VICUNA_7B_LAYERS,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def _clip_l336() -> dict:
    return dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )


def build_llava15(layers, attn, dtype, device):
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 (576 tokens) + Vicuna-7B (32 layers, 4096, MHA)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    proc = llava15_processor()
    tok = proc.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_clip_l336()),
        text_config=LlamaConfig(**_llama_text(layers, 32064, tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    model = instantiate(LlavaForConditionalGeneration, config, dtype, device)
    return model, _inputs_factory(proc, LLAVA15_PROMPT, (336, 336), device, dtype)


LLAVA15_PROMPT = f"USER: <image> {PROMPT_WORDS}ASSISTANT:"


def llava15_processor():
    """The llava-1.5-7b preset's LlavaProcessor (synthetic tokenizer with <image>, 336 px crops, patch 14)."""
    from tokprune.bench.synthetic import llava_processor, make_tokenizer

    return llava_processor(make_tokenizer(["<image>"]), 336, 14)


def build_llava_next(layers, attn, dtype, device):
    """llava-hf/llava-v1.6-vicuna-7b-hf: AnyRes tiles of CLIP-L/336 + Vicuna-7B; a 672x672 image."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from tokprune.bench.synthetic import make_tokenizer

    tok = make_tokenizer(["<image>"])
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_clip_l336()),
        text_config=LlamaConfig(**_llama_text(layers, 32064, tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )
    config._attn_implementation = attn
    model = instantiate(LlavaNextForConditionalGeneration, config, dtype, device)
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, _inputs_factory(proc, f"USER: <image> {PROMPT_WORDS}ASSISTANT:", (672, 672), device, dtype)


def build_qwen25vl(layers, attn, dtype, device):
    """Qwen/Qwen2.5-VL-7B-Instruct: windowed ViT (32 blocks, 1280) + Qwen2 LLM (28 layers, 3584, GQA 28/4);
    a 672x672 image = 48x48 patches = 576 LLM tokens."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tokprune.bench.synthetic import QWEN_SPECIALS, make_tokenizer, qwen_image_processor

    tok = make_tokenizer(QWEN_SPECIALS)
    ids = {k: tok.convert_tokens_to_ids(k) for k in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            in_channels=3,
        ),
        text_config=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=layers or QWEN25_7B_LAYERS,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    config._attn_implementation = attn
    model = instantiate(Qwen2_5_VLForConditionalGeneration, config, dtype, device)
    proc = qwen_image_processor(tok, min_pixels=672 * 672, max_pixels=672 * 672)
    text = (
        f"<|im_start|> USER: <|vision_start|><|image_pad|><|vision_end|> {PROMPT_WORDS}<|im_end|> ASSISTANT:"
    )
    return model, _inputs_factory(proc, text, (672, 672), device, dtype)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "llava-1.5-7b",
            "LLaVA-1.5-7B shapes: 576 visual tokens per image",
            build_llava15,
            "LlavaForConditionalGeneration",
            VICUNA_7B_LAYERS,
        ),
        Preset(
            "llava-next-7b",
            "LLaVA-NeXT-7B shapes: AnyRes, 672x672 image",
            build_llava_next,
            "LlavaNextForConditionalGeneration",
            VICUNA_7B_LAYERS,
        ),
        Preset(
            "qwen2.5-vl-7b",
            "Qwen2.5-VL-7B shapes: 672x672 image = 576 visual tokens",
            build_qwen25vl,
            "Qwen2_5_VLForConditionalGeneration",
            QWEN25_7B_LAYERS,
        ),
    )
}
