"""Turning an lmms-eval request into prompt text + images for a Hugging Face processor.

Processors with a chat template get it (`apply_chat_template`, generation prompt added). Those without
one (the toy VLM's word-level tokenizer) get the plain LLaVA-1.5 format the toy was trained on,
`tokprune.toy.model.prompt`: "USER: <image> {question} ASSISTANT:".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tiff", ".webp"}
ROLES = {"user": "USER:", "assistant": "ASSISTANT:"}


class UnsupportedVisualError(TypeError):
    """A visual input the plugin cannot feed to an image processor (video, audio, unknown types)."""


@dataclass
class Turn:
    """One chat message in processor-neutral form: its role, its images in order, and its text."""

    role: str
    text: str
    images: list[Image.Image] = field(default_factory=list)


def to_image(visual: Any) -> Image.Image:
    """A PIL RGB image from an lmms-eval visual (PIL image, image path, or {"url"/"path": ...} dict)."""
    if isinstance(visual, dict):
        visual = visual.get("url", visual.get("path", visual.get("image", visual)))
    if isinstance(visual, Image.Image):
        return visual.convert("RGB")
    if isinstance(visual, (str, Path)) and Path(visual).suffix.lower() in IMAGE_SUFFIXES:
        return Image.open(visual).convert("RGB")
    raise UnsupportedVisualError(
        f"the tokprune plugin evaluates images only; got {type(visual).__name__} {str(visual)[:80]!r} "
        "(videos and audio are not supported)"
    )


def images_of(visuals: Any) -> list[Image.Image]:
    """Flatten what a task's doc_to_visual returned (None, one visual, or nested lists) into PIL images."""
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [image for item in visuals for image in images_of(item)]
    return [to_image(visuals)]


def has_chat_template(processor: Any) -> bool:
    """Whether the processor (or its tokenizer) carries a chat template."""
    tokenizer = getattr(processor, "tokenizer", None)
    return bool(getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None))


def image_token(processor: Any) -> str:
    """The placeholder the processor expands into visual tokens ("<image>" for LLaVA and the toy)."""
    return getattr(processor, "image_token", None) or "<image>"


def image_placeholder(token: str) -> str:
    """What one image is written as in a plain prompt (Qwen's pad token needs its vision start/end)."""
    return f"<|vision_start|>{token}<|vision_end|>" if token == "<|image_pad|>" else token


def strip_image_tokens(text: str, token: str) -> str:
    """Remove image placeholders a task wrote into its text (the images are placed by the prompt)."""
    if token not in text:
        return text.strip()
    return " ".join(text.replace(image_placeholder(token), " ").replace(token, " ").split())


def plain_prompt(turns: list[Turn], token: str) -> str:
    """The toy's format: "USER: <image> question ASSISTANT:" (a system turn is prefixed as text)."""
    parts = []
    for turn in turns:
        marker = ROLES.get(turn.role, "")
        words = (
            [marker] + [image_placeholder(token)] * len(turn.images) + [strip_image_tokens(turn.text, token)]
        )
        parts.append(" ".join(w for w in words if w))
    return " ".join([*parts, ROLES["assistant"]])


def template_prompt(processor: Any, turns: list[Turn]) -> str:
    """The processor's chat template over the turns, with the generation prompt appended."""
    token = image_token(processor)
    messages = []
    for turn in turns:
        content = [{"type": "image"} for _ in turn.images]
        content.append({"type": "text", "text": strip_image_tokens(turn.text, token)})
        messages.append({"role": turn.role, "content": content})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def render(processor: Any, turns: list[Turn]) -> tuple[str, list[Image.Image]]:
    """(prompt text, images in prompt order) for a conversation."""
    images = [image for turn in turns for image in turn.images]
    if has_chat_template(processor):
        return template_prompt(processor, turns), images
    return plain_prompt(turns, image_token(processor)), images


def turns_from_context(context: str, visuals: Any) -> list[Turn]:
    """A simple-model request (context text + doc_to_visual output) as one user turn."""
    return [Turn("user", context, images_of(visuals))]


def as_dicts(messages: Any) -> list[dict]:
    """Chat messages as plain dicts: a list of dicts, or lmms-eval's pydantic `ChatMessages`."""
    if hasattr(messages, "messages"):
        messages = messages.messages
    return [m.model_dump() if hasattr(m, "model_dump") else m for m in messages]


def turns_from_messages(messages: Any) -> list[Turn]:
    """lmms-eval chat messages ({"role", "content": str | [{"type": "image"|"text", ...}]}) as turns."""
    turns = []
    for message in as_dicts(messages):
        content = message.get("content", "")
        if isinstance(content, str):
            turns.append(Turn(message["role"], content))
            continue
        texts = [item["text"] for item in content if item.get("type") == "text"]
        visuals = [item.get("url", item) for item in content if item.get("type") != "text"]
        turns.append(Turn(message["role"], " ".join(texts), images_of(visuals)))
    return turns
