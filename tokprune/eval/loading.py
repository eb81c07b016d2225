"""Loading the evaluated model: an HF id or local folder through the Auto classes, or the packaged toy.

`load_model(LoadArgs)` is what the lmms-eval plugin uses (every loading key of its model_args);
`load_pretrained(name, dtype, attn)` is the short form the CLI and the demo use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokprune.eval.args import LoadArgs, ModelArgsError

TOY = "toy"
DEFAULT_ATTN = "sdpa"


def resolve_device(device: str | None) -> torch.device:
    """The torch device to run on: the given one, else CUDA when available, else CPU; asking for CUDA on
    a machine without it is a ModelArgsError (before anything is loaded)."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelArgsError(f"device {device} asked for, but CUDA is not available here; use device=cpu")
    return target


def torch_dtype(dtype: str) -> torch.dtype | str:
    """ "auto" (the checkpoint's dtype) or a torch dtype from its name."""
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def model_kwargs(args: LoadArgs) -> dict[str, Any]:
    """Keyword arguments of `from_pretrained` for the model (only the keys that were given)."""
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(args.dtype),
        "attn_implementation": args.attn_implementation or DEFAULT_ATTN,
    }
    if args.revision is not None:
        kwargs["revision"] = args.revision
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if args.device_map is not None:
        kwargs["device_map"] = args.device_map
    return kwargs


def processor_kwargs(args: LoadArgs) -> dict[str, Any]:
    """Keyword arguments of `AutoProcessor.from_pretrained` (revision, remote code, min/max pixels)."""
    kwargs: dict[str, Any] = dict(args.processor_kwargs)
    if args.revision is not None:
        kwargs["revision"] = args.revision
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    return kwargs


def declared_image_kwargs(processor: Any) -> set[str]:
    """The keyword arguments the processor's image processor declares (its `valid_kwargs` TypedDict)."""
    image_processor = getattr(processor, "image_processor", None)
    declared = getattr(image_processor, "valid_kwargs", None)
    if declared is None:
        return set()
    return {key for cls in declared.__mro__ for key in getattr(cls, "__annotations__", {})}


def check_processor_kwargs(processor: Any, kwargs: dict[str, int]) -> None:
    """min_pixels / max_pixels that the processor would silently ignore are a ModelArgsError."""
    ignored = sorted(set(kwargs) - declared_image_kwargs(processor))
    if ignored:
        image_processor = type(getattr(processor, "image_processor", processor)).__name__
        raise ModelArgsError(
            f"{', '.join(ignored)} would have no effect: {image_processor} does not resize images by pixel "
            "count (min_pixels / max_pixels are for processors such as Qwen-VL's); remove them"
        )


def load_toy_model(args: LoadArgs) -> tuple[nn.Module, Any]:
    """The packaged toy in `args.dtype`, placed on `args.device_map` when given."""
    from tokprune.toy.model import load_toy

    refused = [key for key in args.checkpoint_only() if key != "device_map"]
    if refused:
        raise ModelArgsError(
            f"{', '.join(refused)} do not apply to pretrained=toy (the packaged weights, fixed 112 px images)"
        )
    model, processor = load_toy(attn=args.attn_implementation or DEFAULT_ATTN)
    if args.dtype != "auto":
        model = model.to(torch_dtype(args.dtype))
    if args.device_map is not None:
        model = model.to(resolve_device(args.device_map))
    return model, processor


def load_model(args: LoadArgs) -> tuple[nn.Module, Any]:
    """(model, processor) from `args.pretrained`: "toy" = the packaged toy weights, else an HF id or
    folder, loaded with every loading key given (the processor first: its check is cheap)."""
    if args.pretrained is None:
        raise ModelArgsError("give pretrained=<HF id, local folder or 'toy'>, or pass model= and processor=")
    if args.pretrained == TOY:
        return load_toy_model(args)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(args.pretrained, **processor_kwargs(args))
    check_processor_kwargs(processor, args.processor_kwargs)
    model = AutoModelForImageTextToText.from_pretrained(args.pretrained, **model_kwargs(args))
    return model, processor


def load_pretrained(
    pretrained: str, dtype: str, attn_implementation: str | None = None
) -> tuple[nn.Module, Any]:
    """(model, processor) from `pretrained` ("toy", an HF id or a folder) in `dtype` ("auto" = the
    checkpoint's) with `attn_implementation` (None = sdpa)."""
    return load_model(LoadArgs(pretrained=pretrained, dtype=dtype, attn_implementation=attn_implementation))


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


def prepare(model: nn.Module, processor: Any, device: torch.device | None) -> nn.Module:
    """Put the model in eval mode, on `device` unless None (where it is: a device_map placed it), and make
    the tokenizer pad on the left (for generation)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if device is not None and next(model.parameters()).device != device:
        model = model.to(device)
    return model
