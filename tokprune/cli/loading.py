"""The model a command runs on: a benchmark preset, the packaged toy, a local folder or an HF id."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

from tokprune.cli.arguments import CliError, check_device


@contextmanager
def attention_backend(attn: str):
    """Around building a model: transformers' refusal of the --attn backend (flash-attn not installed, an
    architecture without flex_attention) becomes a one-line CliError."""
    try:
        yield
    except (ImportError, ValueError) as error:
        text = str(error)
        if "ttention" not in text:
            raise
        raise CliError(f"--attn {attn} cannot be used here: {text.splitlines()[0]}") from None


def load_model(name: str, layers: int | None, attn: str, dtype: str, device: str):
    """(model, make_inputs(batch_size)) from a preset, a local folder or an HF id."""
    check_device(device)
    with attention_backend(attn):
        return _load_model(name, layers, attn, dtype, device)


def _load_model(name: str, layers: int | None, attn: str, dtype: str, device: str):
    import torch

    from tokprune.bench.presets import PRESETS

    torch_dtype = getattr(torch, dtype)
    if name in PRESETS:
        return PRESETS[name].build(layers, attn, torch_dtype, torch.device(device))
    if layers is not None:
        raise CliError("--layers applies to presets only")
    if name == "toy":
        from tokprune.toy.model import toy_with_inputs

        return toy_with_inputs(attn, torch_dtype, device)
    from tokprune.bench.synthetic import rand_image
    from tokprune.eval.loading import prepare
    from tokprune.eval.prompting import Turn, render

    model, processor = load_checkpoint(name, dtype, attn, also=f"a preset ({', '.join(PRESETS)})")
    model = prepare(model, processor, torch.device(device))  # eval mode, left padding for generate()

    def make_inputs(batch_size: int = 1) -> dict:
        # the model's own prompt format (its chat template), as the demo and the lmms-eval plugin use it
        prompts = [
            render(processor, [Turn("user", "Describe the image in detail.", [rand_image(672, 672, seed=i)])])
            for i in range(batch_size)
        ]
        texts = [text for text, _ in prompts]
        images = [row for _, row in prompts]  # per prompt (Gemma 3 and Idefics3 need them nested)
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        return {
            k: v.to(device=device, dtype=torch_dtype) if v.is_floating_point() else v.to(device)
            for k, v in batch.items()
        }

    return model, make_inputs


def load_checkpoint(name: str, dtype: str, attn: str, also: str = ""):
    """(model, processor) of 'toy' (the packaged weights, in `dtype`), a local folder or an HF id, as
    `tokprune demo` runs them. A name that is neither, a checkpoint that is not on this machine (at once,
    without the Hub's retries), a processor without an image processor or an --attn backend the model
    refuses is a one-line CliError; `also` names what else the command takes."""
    from tokprune.cli.hub import hub_access
    from tokprune.eval.loading import load_pretrained

    local = name == "toy" or Path(name).exists()
    if not local and name.count("/") != 1:
        others = f"{also}, " if also else ""
        raise CliError(
            f"unknown model {name!r}: not {others}'toy', an existing local folder or an HF id (organisation/name)"
        )
    try:
        with attention_backend(attn), nullcontext() if local else hub_access(name):
            model, processor = load_pretrained(name, dtype, attn)
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CliError(f"cannot load {name!r} (its files must be on this machine): {reason}") from None
    check_image_processor(name, processor)
    return model, processor


def check_image_processor(name: str, processor) -> None:
    """A CliError when `name`'s processor cannot turn images into pixels: AutoProcessor falls back to the
    bare tokenizer where the folder has no image-processor config, and the prompt would then carry one
    image placeholder and no pixels."""
    if getattr(processor, "image_processor", None) is None:
        raise CliError(
            f"{name!r} has no image processor (AutoProcessor gave a {type(processor).__name__}): the folder "
            "needs the processor's files next to the weights (preprocessor_config.json or "
            "processor_config.json; save them with processor.save_pretrained(folder))"
        )
