"""Running a method image by image and turning its choices into a keep mask over a sequence."""

from __future__ import annotations

import torch

from tokprune.core.budget import Budget
from tokprune.core.layout import ImageLayout
from tokprune.core.state import TokenMap
from tokprune.methods.base import ImageTokens, LLMMethod, Method, Selection


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


def align_signals(signals: dict[str, torch.Tensor], visual: torch.Tensor) -> dict[str, torch.Tensor]:
    """Signals computed on the original images, aligned with generate()'s expanded batch.

    generate() with num_beams / num_return_sequences = e runs the vision tower once, then repeats every
    row (and its group of images) e times: rows j*e .. j*e + e - 1 are copies of original row j. The ViT
    signals (N_orig, ...) are gathered to the expanded visual-token order (N_orig * e, ...).
    """
    total = int(visual.sum())
    if not signals or all(v.shape[0] == total for v in signals.values()):
        return signals
    n_orig = next(iter(signals.values())).shape[0]
    per_row = visual.sum(1)
    expand = total // n_orig if n_orig and total % n_orig == 0 else 0
    if expand < 2 or per_row.shape[0] % expand:
        raise RuntimeError(f"ViT signals cover {n_orig} visual tokens but the prompt holds {total}")
    original = per_row[::expand]  # visual tokens of each original row
    starts = torch.cumsum(original, 0) - original
    index = torch.cat([starts[j // expand] + torch.arange(int(n)) for j, n in enumerate(per_row.tolist())])
    return {name: value[index.to(value.device)] for name, value in signals.items()}


def select_pre(
    method: Method,
    budget: Budget,
    layout: ImageLayout,
    embeds: torch.Tensor,
    visual: torch.Tensor,
    signals: dict,
    instruction: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Run a pre-LLM method image by image over the LLM input.

    embeds: (B, L, D); visual: (B, L) image-token positions; signals: name -> (N_visual, ...) in
    masked_scatter order; instruction: per image, (m, D) embeddings of its row's text after the images
    (given to methods that list "instruction" in their signals, as ImageTokens.text["embeds"]).
    Returns (keep (B, L) bool, or None if nothing is dropped; embeds with merged tokens written in).
    """
    flat = embeds[visual]  # (N, D) in masked_scatter order
    signals = align_signals(signals, visual)
    keep_flat = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
    merged_flat = None
    start = 0
    for index, (n, grid) in enumerate(zip(layout.counts, layout.grids)):
        span = slice(start, start + n)
        text = {"embeds": instruction[index]} if instruction is not None else {}
        image = ImageTokens(embeds=flat[span], grid=grid, signals=slice_signals(signals, span), text=text)
        selection = checked_select(method, image, budget.kept(n))
        if selection is not None:
            keep_flat[span] = False
            keep_flat[start + selection.keep] = True
            if selection.merged is not None:
                merged_flat = flat.clone() if merged_flat is None else merged_flat
                merged_flat[start + selection.keep] = selection.merged.to(flat.dtype)
        start += n
    if bool(keep_flat.all()):
        return None, embeds
    if merged_flat is not None:
        embeds = embeds.masked_scatter(visual[..., None], merged_flat)
    keep = ~visual
    keep[visual] = keep_flat
    return keep, embeds


def select_llm(
    method: LLMMethod,
    budget: Budget,
    stage: int,
    tokens: TokenMap,
    layout: ImageLayout,
    image_rows: list[int],
    entry_counts: list[int],
    hidden: torch.Tensor,
    signals: dict,
) -> torch.Tensor | None:
    """Per image, keep the stage's count among the visual tokens still present inside the LLM.

    hidden: (B, L_cur, D) residual stream; signals: name -> (B, L_cur, ...). Returns keep (B, L_cur) bool,
    or None when no image loses a token at this stage.
    """
    keep = tokens.valid.clone()
    text = text_after_images(tokens)
    changed = False
    for image, (row, n_entry) in enumerate(zip(image_rows, entry_counts)):
        where = (tokens.image_id[row] == image).nonzero().squeeze(1)
        row_signals = {name: value[row] for name, value in signals.items()}
        view = ImageTokens(
            embeds=hidden[row, where],
            grid=layout.grids[image] if where.numel() == layout.counts[image] else None,
            signals=slice_signals(row_signals, where),
            text=slice_signals(row_signals, text[row]),
        )
        selection = checked_select(method, view, method.stage_counts(n_entry, budget)[stage])
        if selection is None:
            continue
        if selection.merged is not None:
            raise RuntimeError("in-LLM merging is not supported by the engine yet")
        keep[row, where] = False
        keep[row, where[selection.keep]] = True
        changed = True
    return keep if changed else None


def text_after_images(tokens: TokenMap) -> list[torch.Tensor]:
    """Per row: positions of the real text tokens after the row's last visual token (the instruction)."""
    out = []
    for image_id, valid in zip(tokens.image_id, tokens.valid):
        visual = (image_id >= 0).nonzero()
        last = int(visual.max()) if visual.numel() else -1
        positions = torch.arange(image_id.shape[0], device=image_id.device)
        out.append(((positions > last) & valid & (image_id < 0)).nonzero().squeeze(1))
    return out
