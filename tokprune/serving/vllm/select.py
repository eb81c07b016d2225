"""The plugin's pruning step: a plan's method over the images of one vision-tower call, through the same
`tokprune.core.selection.select_pre` the HF engine runs, giving each image its k embeddings."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokprune.core.layout import ImageLayout
from tokprune.core.selection import select_pre
from tokprune.serving.vllm.plan import ServingPlan


def pruned_embeddings(
    plan: ServingPlan,
    embeds: torch.Tensor,
    layout: ImageLayout,
    signals: dict[str, torch.Tensor],
    features: torch.Tensor | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Per image, its kept LLM input rows (k_i, D), k_i = plan.kept(counts[i]).

    embeds: (N, D) the projector's output for all images, one after another (layout.counts); signals: name
    -> (N, ...) the ViT signals in the same order; features: (N, C) the projector's input rows, for a
    method working on the vision features (`Method.features == "vision"`), whose merged rows `project`
    maps to the LLM input. Rows come in the image's raster order, or with plan.order == "selection" in the
    order the method's released code emits them. Raises RuntimeError if an image does not get exactly
    its k rows (vLLM would silently fill the placeholders with the first rows).
    """
    visual = torch.ones(1, embeds.shape[0], dtype=torch.bool, device=embeds.device)
    wanted = {name: value for name, value in signals.items() if name in plan.method.signals}
    use_features = features if plan.method.features == "vision" else None
    chosen = select_pre(
        plan.method, plan.budget, layout, embeds[None], visual, wanted, None, use_features,
        project if use_features is not None else None,
    )  # fmt: skip
    rows = chosen.embeds[0]
    keep = chosen.keep[0] if chosen.keep is not None else torch.ones_like(visual[0])
    out, start = [], 0
    for n in layout.counts:
        span = slice(start, start + n)
        kept = keep[span].nonzero().squeeze(1)
        if plan.order == "selection" and chosen.emission is not None:
            kept = kept[torch.sort(chosen.emission[span][kept], stable=True).indices]
        image_rows = rows[span][kept]
        if image_rows.shape[0] != plan.kept(n):
            raise RuntimeError(
                f"{plan.method.name} kept {image_rows.shape[0]} tokens of an image of {n}, but vLLM holds "
                f"{plan.kept(n)} placeholders for it"
            )
        out.append(image_rows)
        start += n
    return out
