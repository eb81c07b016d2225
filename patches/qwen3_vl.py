"""Qwen3-VL and Qwen3-VL-MoE: the Qwen2-VL layout (CLS-free ViT, 2x2 merge, M-RoPE, images and videos)
plus "deepstack".

The ViT has no [CLS] and no windows: "cls_attention" is the attention each patch receives at the block
feeding the merger (the last one), as on Qwen2-VL. Videos are split into frames in the prompt (a timestamp
and a vision_start / vision_end pair around every frame); their tokens are still consecutive among the
visual tokens, so a video is one item of t frame units (see `qwen2_vl`).

Deepstack: features of intermediate ViT blocks (`deepstack_visual_indexes`) are added to the visual
positions of the LLM's hidden states after decoder layers 0 .. n-1 (`Qwen3VLTextModel._deepstack_process`,
inside the layer loop), from `deepstack_visual_embeds` (n tensors (N_visual, D)) at `visual_pos_masks`
(B, L). Pruning keeps them aligned with the tokens:
  * pre-LLM: both are subset like the LLM input (`compact_lm_kwargs`);
  * in-LLM at boundary b: the adds after layers >= b go to the kept tokens only (`compact_stage` records
    the compaction, an instance wrap of `_deepstack_process` applies it). The adds before b are unchanged.
Both are exact: a dropped token receives no add, a kept one the add it receives unpruned. A kept token that
a merging method rewrote keeps its own deepstack features (they are not merged).

Features before the projector ("features"): the main merger's input, 4 patches per row as on Qwen2-VL
(`norm` per patch, then the MLP: `project`). The deepstack mergers are not re-run on merged rows: a token
whose row a method merged (VisionZip's contextual tokens, PruMerge's supplemented patches) gets the merged
row projected by the main merger as its LLM input, and after decoder layers 0 .. n-1 the deepstack
features of the token whose slot it occupies, computed from that token's own patches. So merging changes
the input of the LLM, not the deepstack adds; methods that drop only are exact.
The MoE variant differs only in the decoder MLP (per-token routing), so one adapter serves both classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.core.compaction import Compaction

from .base import InstanceWrap
from .qwen2_vl import Qwen2VLAdapter


@dataclass
class _DeepstackStage:
    """The deepstack inputs after the in-LLM compactions of the running forward.

    mask: (B, L_cur) bool visual positions of the compacted sequence; select: (N_cur,) long, for each
    still-present visual token its index among the N_source visual tokens the language model received.
    """

    mask: torch.Tensor
    select: torch.Tensor
    n_source: int


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL (dense and MoE decoders)."""

    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    family = "qwen3_vl"

    def __init__(self, model) -> None:
        super().__init__(model)
        self._stage: _DeepstackStage | None = None

    def compact_lm_kwargs(self, kwargs: dict, keep: torch.Tensor, visual: torch.Tensor) -> None:
        """Subset `deepstack_visual_embeds` (n x (N, D)) and `visual_pos_masks` (B, L) like the LLM input."""
        mask, embeds = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if mask is None or embeds is None:
            return
        if not torch.equal(mask.to(visual.device), visual):
            raise RuntimeError(
                "Qwen3-VL's visual_pos_masks differ from the image/video placeholders of the prompt"
            )
        kept = keep[visual]  # (N,) in the row-major order of the deepstack features
        compaction = Compaction.from_keep(keep)
        kwargs["visual_pos_masks"] = compaction.take(visual) & compaction.valid
        kwargs["deepstack_visual_embeds"] = [e[kept.to(e.device)] for e in embeds]

    def compact_stage(self, keep: torch.Tensor, visual: torch.Tensor) -> None:
        kept = keep[visual]  # (N_cur,)
        previous = self._stage
        if previous is None:
            select, n_source = kept.nonzero().squeeze(1), int(visual.sum())
        else:
            select, n_source = previous.select[kept], previous.n_source
        compaction = Compaction.from_keep(keep)
        self._stage = _DeepstackStage(compaction.take(visual) & compaction.valid, select, n_source)

    def install_lm_hooks(self) -> list:
        lm = self.language_model
        reset = lm.register_forward_pre_hook(self._new_lm_forward)
        deepstack = InstanceWrap(lm, "_deepstack_process", self._wrap_deepstack(lm._deepstack_process))
        return [*super().install_lm_hooks(), reset, deepstack]

    def _new_lm_forward(self, module, args) -> None:
        self._stage = None

    def _wrap_deepstack(self, original):
        """`_deepstack_process` that, after an in-LLM compaction, adds to the kept visual tokens only."""

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            stage = self._stage
            if stage is None:
                return original(hidden_states, visual_pos_masks, visual_embeds)
            if (
                stage.mask.shape != hidden_states.shape[:2]
                or visual_embeds.shape[0] != stage.n_source
                or int(visual_pos_masks.sum()) != stage.n_source
            ):
                raise RuntimeError(
                    f"deepstack features for {visual_embeds.shape[0]} visual tokens do not match the pruned "
                    f"sequence {tuple(hidden_states.shape[:2])} (recorded {tuple(stage.mask.shape)} from "
                    f"{stage.n_source} visual tokens)"
                )
            select = stage.select.to(visual_embeds.device)
            return original(hidden_states, stage.mask.to(hidden_states.device), visual_embeds[select])

        return deepstack_process
