"""Running a method image by image and turning its choices into a keep mask over a sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.core.budget import AdaptiveBudget, Budget, split_budget
from tokprune.core.layout import ImageLayout, Unit
from tokprune.core.state import TokenMap
from tokprune.methods.base import (
    ImageTokens,
    LLMMethod,
    Method,
    Selection,
    emission_ranks,
    joined_units,
    slice_signals,
)


def checked_select(method: Method, image: ImageTokens, k: int) -> Selection | None:
    """`method.select` for one image, or None when nothing needs pruning (k >= n). k == 0 (a unit whose
    share of a small budget is nothing) keeps no token without asking the method.

    Raises RuntimeError if the method breaks its contract (k sorted, distinct, in-range indices; merged
    rows of the embeddings' width; `order` a permutation of range(k); `extra` a (k,) bool mask).
    """
    if k >= image.n:
        return None
    if k == 0:
        return Selection(keep=torch.zeros(0, dtype=torch.long, device=image.embeds.device))
    selection = method.select(image, k)
    if not isinstance(selection, Selection):
        raise TypeError(
            f"method {method.name!r}: select() returned {type(selection).__name__}; it must return a "
            "tokprune.methods.Selection, e.g. Selection(keep=topk_sorted(scores, k)) (keep: the k kept slot "
            "indices, sorted; merged / order / extra optional)"
        )
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
    order, extra = selection.order, selection.extra
    if order is not None and not torch.equal(order.sort().values.cpu(), torch.arange(k)):
        raise RuntimeError(f"method {method.name!r} returned an order that is not a permutation of {k}")
    if extra is not None and (extra.dtype != torch.bool or extra.shape != (k,)):
        raise RuntimeError(f"method {method.name!r} returned an extra mask that is not ({k},) bool")
    if extra is not None and bool(extra.any()) and selection.merged is None:
        raise RuntimeError(f"method {method.name!r} marked extra tokens without giving their vectors")
    return selection


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


def select_units(method: Method, image: ImageTokens, k: int) -> Selection | None:
    """`checked_select` on the whole image, or unit by unit for spatial methods on multi-unit images.

    A method with `spatial = True` (it needs a token grid) sees each AnyRes tile / video frame as its own
    image, with the budget split over the units in proportion to their sizes (`split_budget`); the
    others rank the image's tokens together and find the units in `image.units` if they care.
    """
    units = image.units
    if not (method.spatial and units and len(units) > 1) or k >= image.n:
        return checked_select(method, image, k)
    chosen_units = []
    for unit, k_unit in zip(units, split_budget(k, [u.index.numel() for u in units])):
        part = ImageTokens(
            embeds=image.embeds[unit.index], grid=unit.grid,
            signals=slice_signals(image.signals, unit.index), text=image.text,
        )  # fmt: skip
        chosen = checked_select(method, part, k_unit)
        chosen_units.append(chosen if chosen is not None else Selection(keep=torch.arange(part.n)))
    return joined_units(image, units, chosen_units)


def image_view(
    layout: ImageLayout, image: int, local: torch.Tensor, embeds: torch.Tensor, signals: dict, text: dict
) -> tuple[ImageTokens, torch.Tensor]:
    """What a method sees of one image: its present content tokens (separators left out).

    local: (m,) ascending positions of the image's present tokens among its original `counts[image]`;
    embeds: (m, D) and signals (m, ...) of those tokens. Units and the grid are given only while the
    image is whole. Returns (the view, content (m,) bool: which present tokens the view holds).
    """
    separators = layout.separators_of(image)
    content = ~separators[local] if separators is not None else torch.ones_like(local, dtype=torch.bool)
    whole = local.numel() == layout.counts[image]
    units = layout.units_of(image) if whole else None
    if units is not None:
        position = torch.full((layout.counts[image],), -1, dtype=torch.long, device=local.device)
        position[local[content]] = torch.arange(int(content.sum()), device=local.device)
        units = [Unit(index=position[u.index.to(local.device)], grid=u.grid, kind=u.kind) for u in units]
    full_n = layout.counts[image] - (int(separators.sum()) if separators is not None else 0)
    view = ImageTokens(
        embeds=embeds[content], grid=layout.grids[image] if whole else None,
        signals=slice_signals(signals, content), text=text, units=units, full_n=full_n,
    )  # fmt: skip
    return view, content


def image_count(method: Method, budget: Budget, layout: ImageLayout, image: int, view: ImageTokens) -> int:
    """Tokens a pre-LLM method keeps of one image: the budget's count, or the method's own under an
    `AdaptiveBudget` (at least 1, at most the image's tokens)."""
    if isinstance(budget, AdaptiveBudget):
        return min(view.n, max(1, int(method.adaptive_count(view))))
    return item_budget(budget, layout, image).kept(view.n)


def item_budget(budget: Budget, layout: ImageLayout, image: int) -> Budget:
    """`budget` for image `image` of `layout`: a video clip's frame units scale a per-frame token budget
    (`Budget.per_item`; DESIGN §3: budget per frame for video unless `video_budget="clip"`)."""
    units = layout.units_of(image) or []
    return budget.per_item(sum(1 for unit in units if unit.kind == "frame"))


@dataclass
class PreSelection:
    """What a pre-LLM method did to one forward's LLM input.

    keep: (B, L) bool tokens kept, or None when nothing was dropped; embeds: (B, L, D) the LLM input with
    the merged / extra tokens written in; emission: (N_visual,) long, the rank of every kept visual token
    in the order its image's selection emits them (-1 where dropped), or None when no image gave an order;
    extra: (N_visual,) bool, kept visual tokens that carry an extra token (`Selection.extra`).
    """

    keep: torch.Tensor | None
    embeds: torch.Tensor
    emission: torch.Tensor | None = None
    extra: torch.Tensor | None = None


def select_pre(
    method: Method,
    budget: Budget,
    layout: ImageLayout,
    embeds: torch.Tensor,
    visual: torch.Tensor,
    signals: dict,
    instruction: list[torch.Tensor] | None = None,
    features: torch.Tensor | None = None,
    project=None,
) -> PreSelection:
    """Run a pre-LLM method image by image over the LLM input.

    embeds: (B, L, D); visual: (B, L) image-token positions; signals: name -> (N_visual, ...) in
    masked_scatter order; instruction: per image, (m, D) embeddings of its row's text after the images
    (given to methods that list "instruction" in their signals, as ImageTokens.text["embeds"]);
    features: (N_visual, C) the projector's input rows, which a method with `features == "vision"` sees
    instead of the LLM input, and `project` maps its merged rows (m, C) -> (m, D) (a kept row the method
    did not change keeps its LLM input exactly).
    """
    flat = embeds[visual]  # (N, D) in masked_scatter order
    signals = align_signals(signals, visual)
    source = flat if features is None else align_signals({"features": features}, visual)["features"]
    keep_flat = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
    emission = torch.full((flat.shape[0],), -1, dtype=torch.long, device=flat.device)
    extra = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
    merged_flat, ordered = None, False
    start = 0
    for index, n in enumerate(layout.counts):
        span = slice(start, start + n)
        text = {"embeds": instruction[index]} if instruction is not None else {}
        local = torch.arange(n, device=flat.device)
        view, content = image_view(layout, index, local, source[span], slice_signals(signals, span), text)
        selection = select_units(method, view, image_count(method, budget, layout, index, view))
        if selection is not None:
            kept = start + local[content][selection.keep]
            keep_flat[span] = False
            keep_flat[kept] = True
            emission[kept] = emission_ranks(selection).to(flat.device)
            ordered |= selection.order is not None
            if selection.extra is not None:
                extra[kept] = selection.extra.to(flat.device)
            if selection.merged is not None:
                merged_flat = flat.clone() if merged_flat is None else merged_flat
                merged_flat[kept] = _llm_rows(selection.merged, source[kept], flat[kept], project)
        start += n
    if bool(keep_flat.all()):
        return PreSelection(None, embeds)
    if merged_flat is not None:
        embeds = embeds.masked_scatter(visual[..., None], merged_flat)
    keep = ~visual
    keep[visual] = keep_flat
    return PreSelection(keep, embeds, emission if ordered else None, extra if bool(extra.any()) else None)


def _llm_rows(merged: torch.Tensor, own: torch.Tensor, llm: torch.Tensor, project) -> torch.Tensor:
    """The LLM input of a selection's kept rows: merged (k, C) in the method's space, own (k, C) the rows'
    own vectors there, llm (k, D) their LLM input. Without a projector the merged rows are the LLM input;
    with one, rows the method changed are projected and the others keep their LLM input."""
    if project is None:
        return merged.to(llm.dtype)
    changed = (merged.to(own.dtype) != own).any(-1)
    rows = llm.clone()
    if bool(changed.any()):
        rows[changed] = project(merged[changed].to(own.dtype)).to(llm.dtype)
    return rows


def image_offsets(image_rows: list[int], counts: list[int]) -> list[int]:
    """Visual rank (within its row) of every image's first token."""
    offsets, previous_row, filled = [], -1, 0
    for row, n in zip(image_rows, counts):
        filled = 0 if row != previous_row else filled
        offsets.append(filled)
        filled, previous_row = filled + n, row
    return offsets


def present_tokens(tokens: TokenMap, layout: ImageLayout, image_rows: list[int], image: int, offset: int):
    """(positions (m,) in the row's current sequence, local (m,) positions within the image)."""
    row = image_rows[image]
    where = (tokens.image_id[row] == image).nonzero().squeeze(1)
    return where, tokens.visual_rank[row, where] - offset


def content_counts(tokens: TokenMap, layout: ImageLayout, image_rows: list[int]) -> list[int]:
    """Per image, the content tokens (separators left out) present in the current sequence."""
    counts = []
    for image, offset in enumerate(image_offsets(image_rows, layout.counts)):
        _, local = present_tokens(tokens, layout, image_rows, image, offset)
        separators = layout.separators_of(image)
        counts.append(local.numel() - (int(separators[local].sum()) if separators is not None else 0))
    return counts


@dataclass
class LLMSelection:
    """What an in-LLM stage chose over the current sequence (B, L_cur).

    keep: bool, or None when no image loses a token; hidden: the stream with merged states written in;
    emission: long, the rank of every kept visual slot in its image's emission order (-1 elsewhere), or None
    when no image gave an order; extra: bool, kept slots carrying an extra token (`Selection.extra`)."""

    keep: torch.Tensor | None
    hidden: torch.Tensor
    emission: torch.Tensor | None = None
    extra: torch.Tensor | None = None


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
) -> LLMSelection:
    """Per image, keep the stage's count among the visual tokens still present inside the LLM.

    hidden: (B, L_cur, D) residual stream; signals: name -> (B, L_cur, ...); entry_counts: content tokens
    of each image entering the LLM. Merged states of kept tokens are written into a copy of hidden.
    """
    keep = tokens.valid.clone()
    emission = torch.full(keep.shape, -1, dtype=torch.long, device=keep.device)
    extra = torch.zeros_like(keep)
    text = text_after_images(tokens)
    changed, ordered, merged = False, False, None
    offsets = image_offsets(image_rows, layout.counts)
    for image, (row, n_entry) in enumerate(zip(image_rows, entry_counts)):
        where, local = present_tokens(tokens, layout, image_rows, image, offsets[image])
        row_signals = {name: value[row] for name, value in signals.items()}
        view, content = image_view(
            layout, image, local, hidden[row, where], slice_signals(row_signals, where),
            slice_signals(row_signals, text[row]),
        )  # fmt: skip
        counts = method.stage_counts(n_entry, item_budget(budget, layout, image))
        selection = select_units(method, view, counts[stage])
        if selection is None:
            continue
        kept = where[content][selection.keep]
        if selection.merged is not None:
            merged = hidden.clone() if merged is None else merged
            merged[row, kept] = selection.merged.to(hidden.dtype)
        keep[row, where] = False
        keep[row, kept] = True
        emission[row, kept] = emission_ranks(selection).to(keep.device)
        ordered |= selection.order is not None
        if selection.extra is not None:
            extra[row, kept] = selection.extra.to(keep.device)
        changed = True
    return LLMSelection(
        keep if changed else None,
        merged if merged is not None else hidden,
        emission if ordered else None,
        extra if bool(extra.any()) else None,
    )


def selection_key(
    tokens: TokenMap, visual: torch.Tensor, emission: torch.Tensor | None
) -> torch.Tensor | None:
    """(B, L) sort key laying each image's kept tokens out in its selection's emission order, in the image's
    own place in the sequence (text before and after it stays where it is); None: no order.

    visual: (B, L) bool visual slots of the sequence `tokens` maps; emission: (N_visual,) long, per visual
    slot in row-major order, its rank in its image's emission order (any value where dropped)."""
    if emission is None:
        return None
    key = torch.arange(visual.shape[1], device=visual.device).expand(visual.shape).clone()
    image_id = tokens.image_id[visual]  # (N_visual,)
    first = torch.full((int(image_id.max()) + 1,), visual.shape[1], dtype=torch.long, device=visual.device)
    first = first.scatter_reduce(0, image_id, key[visual], reduce="amin")
    key[visual] = first[image_id] + emission.clamp_min(0)
    return key


def flagged_visual(flags: torch.Tensor | None, visual_rank: torch.Tensor) -> list[torch.Tensor] | None:
    """Per row, the sorted visual-token indices of the slots `flags` (B, L) marks (None: none)."""
    if flags is None:
        return None
    return [rank[row].sort().values for rank, row in zip(visual_rank, flags)]


def text_after_images(tokens: TokenMap) -> list[torch.Tensor]:
    """Per row: positions of the real text tokens after the row's last visual token in the input (the
    instruction), in the current sequence; pruning the last image's tokens does not move its start."""
    after = tokens.origin >= tokens.instruction_start[:, None]
    return [row.nonzero().squeeze(1) for row in after & tokens.prompt & (tokens.image_id < 0)]
