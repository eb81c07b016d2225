"""Offline stand-ins for hub assets: a word-level tokenizer, processors without torchvision, images.

Used by the benchmark presets (random-weight models with real shapes) and by the test suite's tiny
models, so that prompts are laid out by the real processors (image-token counts, grids, AnyRes tiles).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(80)] + ["USER:", "ASSISTANT:", "describe", "the", "image", "please", "and"]
QWEN_SPECIALS = [
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_start|>",
    "<|im_end|>",
]


def make_tokenizer(
    specials: list[str], words: list[str] | None = None, split_punctuation: bool = True
) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over `words` (default WORDS); `specials` are special added tokens so that
    '<image><image>' splits right. With split_punctuation=False words split on whitespace only, so that
    words such as 'USER:' stay whole."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<s>", "</s>", *(words or WORDS)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.padding_side = "left"
    return tok


def qwen_image_processor(tokenizer, min_pixels: int, max_pixels: int):
    """Qwen2-VL processor for images only (its video processor needs torchvision, which is not installed)."""
    from transformers import ProcessorMixin, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ip = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    return Qwen2VLImageOnlyProcessor(image_processor=ip, tokenizer=tokenizer)


def llava_processor(tokenizer, image_size: int, patch_size: int, *, cls: bool = True, **image_kwargs):
    """LlavaProcessor over square `image_size` crops: a tower with a [CLS] token under the "default"
    strategy (the [CLS] dropped), or (cls=False, SigLIP) one without under "full" (every patch kept)."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    ip = LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        **image_kwargs,
    )
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default" if cls else "full",
        num_additional_image_tokens=int(cls),
    )


def rand_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
