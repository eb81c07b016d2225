"""VisionZip: dominant tokens by [CLS] attention, contextual tokens merged into uniformly spaced targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget, split_budget
from tokprune.core.layout import Unit
from tokprune.errors import MethodOptionError
from tokprune.methods.base import (
    ImageTokens,
    Method,
    Selection,
    emission_ranks,
    free_slots,
    joined_units,
    slice_signals,
    topk_sorted,
)
from tokprune.methods.options import check_bool, check_choice, check_number

MERGES = ("add", "mean")
SPACES = ("vision", "llm")
CLS = "vit_cls"


@dataclass
class VisionZip(Method):
    """VisionZip — Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    CVPR 2025. Default: the authors' released code, github.com/dvlab-research/VisionZip at commit 3151f6d
    (`visionzip/clip_encoder.py: CLIPVisionTower_VisionZip.forward`, `visionzip/main.py: visionzip`,
    `visionzip/llava_arch.py`), on the vision tower's features before the projector.

    For an image (an AnyRes tile: each one separately, as the code runs the tower per tile) of n patches
    and a budget of k tokens, with c = round(k * contextual_ratio) contextual tokens:
      * dominant: the [CLS] token itself (where the tower has one, `cls_token`) and the k - c - 1 patches of
        highest [CLS] attention at ViT layer -2 (head mean; the code sums the heads: same order);
      * contextual: of the remaining patches in raster order, c targets at 0, s, 2s, ... with
        s = max(1, n_rest // c); every other remaining patch joins the target whose head-mean key (layer
        -2, L2-normalised) is most similar (ties: the first); a target becomes target + mean(its patches)
        (`merge="add"`, the code: `contextual_tokens = target_hidden + aggregated_hidden`);
      * everything on the features the projector receives (hidden_states[-2]), then projected
        (`merge_space="vision"`).
    Published split (`visionzip(model, dominant=54, contextual=10)` etc.): 64 = 54 + 10, 128 = 108 + 20,
    192 = 162 + 30, the [CLS] token among the dominant ones (contextual_ratio = 10/64); default 64.
    The code hands the LLM [CLS], the dominant patches in raster order, then the contextual tokens in
    target order (`Selection.order`); on LLaVA-NeXT, the base view that way, then every tile's dominant
    patches in the order of the tile mosaic, every tile's [CLS], every tile's contextual tokens.

    In tokprune the k tokens occupy k of the image's slots: the patches their own, the [CLS] token the
    image's (tile's) first free slot (`Selection.extra`), so by default it sits at that slot's original
    position; `tokprune.apply(..., order="selection", positions="contiguous")` reproduces the code's
    sequence exactly (LLaVA-1.5 and LLaVA-NeXT, the families of the released code).

    Options: contextual_ratio (c / k); merge: "add" (the code) or "mean" (a target becomes the mean of
    itself and its patches, tokprune's earlier reading of the paper's "merging"); merge_space: "vision"
    (before the projector, the code) or "llm" (the LLM input embeddings, after the projector); cls_token:
    keep the [CLS] token as a dominant token (the code) or take all k tokens from the patches.

    Remaining differences from the code: (1) ties in the [CLS] attention go to the lower index (torch.topk's
    order on ties is unspecified); (2) HF's LLaVA-NeXT unpads the tile mosaic before the LLM, so patches in
    the padded margin, which the code can keep, do not exist here (square images are not unpadded); (3) the
    code's NeXT path drops the `image_newline` tokens as tokprune does for every pruned image; (4) towers
    without [CLS] (SigLIP, Qwen) use the attention each patch receives and no [CLS] token (the code has no
    such path).
    """

    name = "visionzip"
    family = "[CLS] attention + merge"
    default_budget = Budget(tokens=64)
    paper = "Yang et al., CVPR 2025 (VisionZip)"
    code_families = ("llava", "llava_next")

    contextual_ratio: float = 10 / 64
    merge: str = "add"
    merge_space: str = "vision"
    cls_token: bool = True

    def __post_init__(self) -> None:
        check_number(self, "contextual_ratio", 0, 1, high_open=True)
        check_choice(self, "merge", MERGES)
        check_choice(self, "merge_space", SPACES)
        check_bool(self, "cls_token")
        if self.cls_token and self.merge_space == "llm":
            raise MethodOptionError(
                "visionzip: the [CLS] token (cls_token=True) exists only before the projector; with "
                "merge_space='llm' pass cls_token=False as well"
            )

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("cls_attention", "vit_keys", CLS) if self.cls_token else ("cls_attention", "vit_keys")

    @property
    def features(self) -> str:  # type: ignore[override]
        return self.merge_space

    def select(self, image: ImageTokens, k: int) -> Selection:
        units = image.units
        if not units or len(units) == 1:
            return self._select_grid(image, k)
        return self._select_tiles(image, units, k)

    def _select_grid(self, image: ImageTokens, k: int) -> Selection:
        """One ViT pass (an image, a tile)."""
        return self._parts(image, k)[0]

    def _parts(self, image: ImageTokens, k: int) -> tuple[Selection, torch.Tensor]:
        """(the Selection of one ViT pass, kinds (k,) of its kept slots: 0 extra, 1 dominant, 2 contextual)."""
        cls = image.signals.get(CLS) if self.cls_token else None
        cls_vector = cls[0].to(image.embeds.device) if cls is not None and image.n else None
        n_context = round(k * self.contextual_ratio) if k > 1 else 0
        return contextual_parts(
            image.embeds, image.signals["cls_attention"], image.signals["vit_keys"], k, n_context,
            merge=self.merge, cls_vector=cls_vector,
        )  # fmt: skip

    def _select_tiles(self, image: ImageTokens, units: list[Unit], k: int) -> Selection:
        """AnyRes: every unit (base view, tiles) as its own ViT pass, the budget split by size (equal for
        whole tiles, as the code's per-tile counts), emitted as the code's LLaVA-NeXT path does."""
        chosen, kinds = [], []
        for unit, k_unit in zip(units, split_budget(k, [u.index.numel() for u in units])):
            part = ImageTokens(
                embeds=image.embeds[unit.index],
                grid=unit.grid,
                signals=slice_signals(image.signals, unit.index),
            )
            if 0 < k_unit < part.n:
                selection, kind = self._parts(part, k_unit)
            else:  # the unit keeps all or none of its tokens: all of them count as dominant
                n = part.n if k_unit >= part.n else 0
                selection = Selection(keep=torch.arange(n, device=part.embeds.device))
                kind = torch.ones(n, dtype=torch.long)
            chosen.append(selection)
            kinds.append(kind)
        joined = joined_units(image, units, chosen)
        joined.order = _anyres_order(units, chosen, kinds, joined.keep)
        return joined


def _anyres_order(
    units: list[Unit], chosen: list[Selection], kinds: list[torch.Tensor], keep: torch.Tensor
) -> torch.Tensor:
    """The code's LLaVA-NeXT order over the joined kept slots `keep` (sorted): the base view's own order
    (extra, dominant, contextual); then the tiles' dominant patches in slot order (the tile mosaic's raster
    order), the tiles' extra tokens in tile order, the tiles' contextual tokens in tile order (each tile's in
    target order)."""
    key = torch.empty(keep.numel(), dtype=torch.float64)
    rank_of_slot = {slot: i for i, slot in enumerate(keep.tolist())}
    emitted = 0  # tokens of the tiles before this one (orders the tiles' extra and contextual groups)
    for unit, selection, kind in zip(units, chosen, kinds):
        slots = unit.index[selection.keep.to(unit.index.device)].tolist()
        own = emission_ranks(selection).tolist()
        for slot, rank, group in zip(slots, own, kind.tolist()):
            if unit.kind == "base":
                value = rank
            else:  # after the base view: dominant (by slot), then extra, then contextual (by tile, target)
                value = {1: 1e7 + slot, 0: 2e7 + emitted + rank, 2: 3e7 + emitted + rank}[group]
            key[rank_of_slot[slot]] = value
        if unit.kind != "base":
            emitted += len(slots)
    return key.argsort().to(keep.device)


def dominant_contextual(
    embeds: torch.Tensor,
    scores: torch.Tensor,
    metric: torch.Tensor,
    k: int,
    n_context: int,
    merge: str = "mean",
    cls_vector: torch.Tensor | None = None,
) -> Selection:
    """VisionZip's rule: k - n_context dominant tokens by `scores`, n_context merged contextual tokens (see
    `contextual_parts`)."""
    return contextual_parts(embeds, scores, metric, k, n_context, merge, cls_vector)[0]


def contextual_parts(
    embeds: torch.Tensor,
    scores: torch.Tensor,
    metric: torch.Tensor,
    k: int,
    n_context: int,
    merge: str = "mean",
    cls_vector: torch.Tensor | None = None,
) -> tuple[Selection, torch.Tensor]:
    """VisionZip's rule on one ViT pass; returns (the Selection, kinds (k,): 0 extra, 1 dominant, 2
    contextual, per kept slot).

    embeds: (n, D); scores: (n,) importance; metric: (n, d) features whose cosine similarity assigns the
    merged tokens; cls_vector: (D,) or None, an extra token counted among the dominant ones (VisionZip's
    [CLS]), placed in the first free slot. Dominant: the k - n_context - (1 if cls_vector) top tokens by
    score. Contextual targets: n_context tokens uniformly spaced (step max(1, n_rest // n_context)) over the
    remaining tokens in order; every other remaining token joins its most similar target (ties: the first);
    a target becomes, merge="mean": the mean of itself and the tokens it absorbed; merge="add": itself + the
    mean of the tokens it absorbed (itself if none). float32, cast back to embeds' dtype. The Selection's
    order is [extra, dominant ascending, targets ascending].
    """
    n_extra = int(cls_vector is not None)
    n_context = max(0, min(n_context, k - n_extra))
    dominant = topk_sorted(scores, k - n_context - n_extra)
    rest = torch.ones(embeds.shape[0], dtype=torch.bool, device=dominant.device)
    rest[dominant] = False
    rest = rest.nonzero().squeeze(1)  # remaining tokens, in order
    values = embeds.float()
    targets, rows = rest[:0], values[:0]
    if n_context > 0:
        step = max(1, rest.numel() // n_context)
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
        is_target[torch.arange(0, rest.numel(), step, device=rest.device)[:n_context]] = True
        targets, others = rest[is_target], rest[~is_target]
        rows = _merged_targets(values, F.normalize(metric.float(), dim=-1), targets, others, merge)
    extra = free_slots(torch.cat([dominant, targets]).sort().values, embeds.shape[0], n_extra)
    parts = [extra, dominant, targets]
    vectors = [values[:0] if cls_vector is None else cls_vector.float()[None], values[dominant], rows]
    kinds = torch.cat([torch.full((p.numel(),), kind, dtype=torch.long) for kind, p in enumerate(parts)])
    keep, by_slot = torch.cat(parts).sort()
    kinds = kinds[by_slot.cpu()]
    selection = Selection(
        keep=keep,
        merged=torch.cat(vectors)[by_slot].to(embeds.dtype) if (n_context or n_extra) else None,
        order=by_slot.argsort(),
        extra=(kinds == 0).to(keep.device) if n_extra else None,
    )
    return selection, kinds


def _merged_targets(
    values: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, others: torch.Tensor, merge: str
) -> torch.Tensor:
    """(c, D) the contextual tokens: values (n, D) float32, keys (n, d) unit vectors."""
    owner = (keys[others] @ keys[targets].T).argmax(1)  # most similar target of every other token
    sums = torch.zeros(targets.numel(), values.shape[1], device=values.device).index_add(
        0, owner, values[others]
    )
    counts = torch.zeros(targets.numel(), device=values.device).index_add(
        0, owner, torch.ones_like(owner, dtype=torch.float)
    )
    if merge == "add":
        return values[targets] + sums / counts.clamp_min(1)[:, None]
    return (values[targets] + sums) / (1 + counts)[:, None]
