"""The model a command runs on: a benchmark preset, the packaged toy, a local folder or an HF id."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from tokprune.cli.arguments import CliError


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
    if not Path(name).exists() and name.count("/") != 1:
        raise CliError(
            f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}), 'toy', a local folder or an HF id"
        )
    from tokprune.bench.synthetic import rand_image
    from tokprune.eval.loading import load_pretrained

    try:
        model, processor = load_pretrained(name, dtype, attn)
    except OSError as error:
        raise CliError(f"cannot load {name!r} (weights must be on this machine): {error}") from None
    model = model.to(device).eval()

    def make_inputs(batch_size: int = 1) -> dict:
        token = getattr(processor, "image_token", "<image>")
        texts = [f"USER: {token}\nDescribe the image in detail. ASSISTANT:"] * batch_size
        images = [rand_image(672, 672, seed=i) for i in range(batch_size)]
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        return {
            k: v.to(device=device, dtype=torch_dtype) if v.is_floating_point() else v.to(device)
            for k, v in batch.items()
        }

    return model, make_inputs
