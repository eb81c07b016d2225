"""Loading the evaluated model: an HF id or local folder through the Auto classes, or the packaged toy."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokprune.eval.args import ModelArgsError

TOY = "toy"
DEFAULT_ATTN = "sdpa"


def resolve_device(device: str | None) -> torch.device:
    """The torch device to run on: the given one, else CUDA when available, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def torch_dtype(dtype: str) -> torch.dtype | str:
    """ "auto" (the checkpoint's dtype) or a torch dtype from its name."""
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def load_pretrained(
    pretrained: str, dtype: str, attn_implementation: str | None = None
) -> tuple[nn.Module, Any]:
    """(model, processor) from `pretrained`: "toy" = the packaged toy weights, else an HF id or folder;
    dtype "auto" = the checkpoint's; attn_implementation None = sdpa."""
    attn_implementation = attn_implementation or DEFAULT_ATTN
    if pretrained == TOY:
        from tokprune.toy.model import load_toy

        model, processor = load_toy(attn=attn_implementation)
        if dtype != "auto":
            model = model.to(torch_dtype(dtype))
        return model, processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        pretrained, dtype=torch_dtype(dtype), attn_implementation=attn_implementation
    )
    return model, AutoProcessor.from_pretrained(pretrained)


def configure(model: nn.Module, dtype: str, attn_implementation: str | None) -> nn.Module:
    """Apply the plugin's dtype (unless "auto") and attention backend (unless None) to an already built
    model, in place (as `device` is); a backend the model refuses is a ModelArgsError."""
    if attn_implementation is not None:  # every sub-model (vision tower, LLM) gets it
        try:
            model.set_attn_implementation(attn_implementation)
        except (ImportError, ValueError) as error:
            reason = str(error).strip().splitlines()[0]
            raise ModelArgsError(
                f"attn_implementation={attn_implementation} cannot be used: {reason}"
            ) from None
    if dtype != "auto":
        model = model.to(torch_dtype(dtype))
    return model


def prepare(model: nn.Module, processor: Any, device: torch.device) -> nn.Module:
    """Put the model in eval mode on `device` and make the tokenizer pad on the left (for generation)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if next(model.parameters()).device != device:
        model = model.to(device)
    return model
