"""Tiny SmolVLMForConditionalGeneration and Idefics3ForConditionalGeneration (random weights), built offline.

SigLIP towers without [CLS] over 112 px frames of 8x8 patches; the connector's pixel shuffle (scale 2)
makes 4x4 = 16 LLM tokens per frame. Processors:
  * SmolVLM: the real `SmolVLMProcessor` over the PIL `SmolVLMImageProcessorPil`, images split into
    tiles + a global view (longest edge 224: a square image -> 2x2 tiles + global, a 1:3 image -> 1x2 +
    global). Its `__init__` is replaced because it requires a video processor (whose base class needs
    torchvision, not installed) and the `num2words` package (video prompts only);
  * Idefics3: the real `Idefics3Processor` over `Idefics3ImageProcessorPil` without image splitting, so
    that every image is one global frame (the other layout of the family).
"""

from __future__ import annotations

import torch

from tokprune.bench.synthetic import make_tokenizer

GLOBAL_IMAGE = "<global-img>"
SMOLVLM_SPECIALS = [
    "<image>",
    "<fake_token_around_image>",
    GLOBAL_IMAGE,
    "<end_of_utterance>",
    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
]
FRAME = 112  # px per frame (= the ViT's image size)
PATCH = 14
SCALE = 2
FRAME_TOKENS = (FRAME // PATCH // SCALE) ** 2  # LLM tokens per frame
# image sizes for batch_inputs: different tilings in one batch
SMOLVLM_SIZES = ((112, 112), (112, 336))


class NestsImages:
    """Processor mixin: a flat list of images is nested per prompt (these processors want one list of
    images per text), by the number of `<image>` placeholders each text holds (tiny_models.batch_inputs
    passes flat lists, as the other families' processors take them)."""

    def __call__(self, images=None, text=None, **kwargs):
        if images is not None and text is not None and not any(isinstance(i, (list, tuple)) for i in images):
            texts = [text] if isinstance(text, str) else text
            flat = iter(images)
            images = [[next(flat) for _ in range(t.count(self.image_token))] for t in texts]
        return super().__call__(images=images, text=text, **kwargs)


def smolvlm_processor(tok):
    """SmolVLMProcessor for images only (no video processor: it needs torchvision and num2words)."""
    from transformers import ProcessorMixin, SmolVLMImageProcessorPil, SmolVLMProcessor

    class SmolVLMImageOnlyProcessor(NestsImages, SmolVLMProcessor):
        def __init__(
            self, image_processor=None, tokenizer=None, image_seq_len=169, chat_template=None, **kwargs
        ):
            self.fake_image_token, self.image_token = "<fake_token_around_image>", "<image>"
            self.global_image_token, self.end_of_utterance_token = GLOBAL_IMAGE, "<end_of_utterance>"
            self.video_token = "<video>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.image_seq_len = image_seq_len
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ip = SmolVLMImageProcessorPil(size={"longest_edge": 2 * FRAME}, max_image_size={"longest_edge": FRAME})
    return SmolVLMImageOnlyProcessor(image_processor=ip, tokenizer=tok, image_seq_len=FRAME_TOKENS)


def idefics3_processor(tok):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    class Idefics3FlatImagesProcessor(NestsImages, Idefics3Processor):
        pass

    ip = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * FRAME}, max_image_size={"longest_edge": FRAME}, do_image_splitting=False
    )
    return Idefics3FlatImagesProcessor(image_processor=ip, tokenizer=tok, image_seq_len=FRAME_TOKENS)


def _tiny(cls_name: str, attn: str, processor):
    import transformers
    from tiny_models import _text_config

    torch.manual_seed(0)
    tok = make_tokenizer(SMOLVLM_SPECIALS)
    config_cls = getattr(transformers, cls_name.replace("ForConditionalGeneration", "Config"))
    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=FRAME,
        patch_size=PATCH,
    )  # fmt: skip
    cfg = config_cls(
        vision_config=vision,
        text_config=dict(model_type="llama", **_text_config(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=SCALE,
    )
    cfg._attn_implementation = attn
    model = getattr(transformers, cls_name)(cfg).eval()
    return model, processor(tok)


def tiny_smolvlm(attn: str = "sdpa"):
    return _tiny("SmolVLMForConditionalGeneration", attn, smolvlm_processor)


def tiny_idefics3(attn: str = "sdpa"):
    return _tiny("Idefics3ForConditionalGeneration", attn, idefics3_processor)


@torch.no_grad()
def smolvlm_counts(model, inputs) -> tuple[list[int], list[int]]:
    """Tokens per image, from the prompt by the processor's format (plain Python, independent of
    tokprune): an image ends with the image-token run that follows a `<global-img>` token. Checked
    against the features the model computes for the real frames. Every token is content."""
    image_id = model.config.image_token_id
    global_id = make_tokenizer(SMOLVLM_SPECIALS).convert_tokens_to_ids(GLOBAL_IMAGE)
    counts = []
    for row in inputs["input_ids"].tolist():
        n, in_global = 0, False
        for previous, token in zip([None, *row], row):
            if token == image_id:
                n += 1
                in_global = in_global or previous == global_id
            elif previous == image_id and in_global:
                counts.append(n)
                n, in_global = 0, False
    features = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"]
    ).pooler_output
    assert sum(counts) == sum(f.shape[0] for f in features)
    return counts, counts
