"""Running a method image by image and turning its choices into a keep mask over a sequence."""

from __future__ import annotations

import torch

from tokprune.methods.base import ImageTokens, Method, Selection


def checked_select(method: Method, image: ImageTokens, k: int) -> Selection | None:
    """`method.select` for one image, or None when nothing needs pruning (k >= n).

    Raises RuntimeError if the method breaks its contract (k sorted, distinct, in-range indices).
    """
    if k >= image.n:
        return None
    selection = method.select(image, k)
    keep = selection.keep
    ok = (
        keep.dtype == torch.long
        and keep.shape == (k,)
        and (k == 0 or (int(keep[0]) >= 0 and int(keep[-1]) < image.n))
        and bool((keep[1:] > keep[:-1]).all())
    )
    if not ok:
        raise RuntimeError(
            f"method {method.name!r} returned an invalid selection for k={k} of n={image.n}: {keep}"
        )
    if selection.merged is not None and selection.merged.shape != (k, image.embeds.shape[-1]):
        raise RuntimeError(
            f"method {method.name!r} returned merged embeddings of shape {tuple(selection.merged.shape)}"
        )
    return selection


def slice_signals(signals: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    """The same tokens (`index` along dim 0) of every signal."""
    return {name: value[index] for name, value in signals.items()}
