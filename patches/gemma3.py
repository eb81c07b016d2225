"""Gemma 3 (Gemma3ForConditionalGeneration): SigLIP tower, average-pooling projector, Gemma 3 text model.

Vision side. SigLIP has no [CLS]; its last layer (after `post_layernorm`) feeds the projector, which
average-pools the P x P patch grid with an `AvgPool2d` of kernel P / sqrt(mm_tokens_per_image) into
the LLM tokens of the image (4096 patches -> 256 tokens on the released models), one square grid per
image. "cls_attention" is therefore the attention each patch *receives* (column mean of the softmax
map, streamed), and every ViT signal ("received_attention", "vit_keys" = head-mean keys too) is pooled
by the projector's own pooling module, so one value belongs to exactly the patches averaged into one
LLM token. The pre-softmax logit means ("logit_column_mean", "logit_row_mean") run over all patches and
are pooled the same way; the signals of the [CLS] query become those of what each patch receives (`Adapter.without_cls`).
Features before the projector ("features"): the projector pools, then normalises (RMS) and projects; a
feature row is the pooled patch feature of an LLM token, *before* the norm (the projector's own pooling
of its input), and `project` is the norm and the matmul. No "vit_cls" (SigLIP has no [CLS]).

Language side (DESIGN §4). `Gemma3Model.forward` turns the 2-D `attention_mask` and `token_type_ids`
into a dict of 4-D masks, one per layer type, before it calls the language model:
  * "full_attention": causal OR same image block (every run of image tokens attends to itself
    bidirectionally), AND padding;
  * "sliding_attention": the same AND a sliding window over cache slots (a key is visible when it
    sits less than `sliding_window` slots before the query).
The engine keeps the 2-D mask it sees at the inner model, compacts it, and asks this adapter for the
family's masks (`layer_mask`): the kept image tokens of an image still form one bidirectional block,
dropped ones are gone. Decode steps have no image queries, so their masks are the plain causal and
sliding ones (as `generate()` does without `token_type_ids`). Each layer type has its own RoPE table
(global and local bases); the engine gathers every table on in-LLM compaction.

Sliding window after pruning: the window counts cache *slots*, so a pruned sequence's window spans
the last `sliding_window` kept tokens, which covers more of the original prompt. tokprune keeps the
model's rule as is (no re-widening, no per-token positions in the window): the window applies to the
compacted sequence, in prefill and decode (the sliding cache keeps the last window - 1 slots).

`token_type_ids` must mark exactly the image tokens (what Gemma3Processor returns) or be absent (then
the model's masks are plainly causal and so are tokprune's).

Pan-and-scan (`do_pan_and_scan=True`): the processor gives an image its original view plus up to
`pan_and_scan_max_num_crops` crops, each a full image of `mm_tokens_per_image` tokens to the model, in
pixel_values order, and drops `num_crops` from the model's inputs. The prompt separates the views of one
image exactly as it separates adjacent images (`<end_of_image>` `\n\n` ... `\n\n` `<start_of_image>`; only
the text before the first view, "Here is the original image", differs, and it is plain text), so nothing
the model receives tells which views belong together. Every view is therefore one budget unit, pruned on
its own grid: `budget=k` keeps k tokens of every view, i.e. k x (1 + crops) of an image with crops;
`keep_ratio` keeps the same fraction of every view (`tests/test_gemma3_pan_and_scan.py`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import blockwise_overlay, create_causal_mask, sliding_window_overlay
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from tokprune.core.compat import CACHE_KWARG
from tokprune.core.state import TokenMap
from tokprune.core.timing import timed
from tokprune.errors import UnsupportedInputError
from tokprune.signals import LOGIT_SIGNALS, logit_signal, received_attention

from .base import Adapter, ImageLayout, ProjectionTap, VisionSignalStore
from .llava import clip_encoder_layers


class Gemma3Adapter(Adapter):
    """Every image is one square grid of `mm_tokens_per_image` tokens, pooled from the SigLIP patches."""

    model_classes = ("Gemma3ForConditionalGeneration",)
    family = "gemma3"
    feature_signals = ("features",)  # the pooled patches before the projector's norm (SigLIP has no [CLS])

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.vision_layers = clip_encoder_layers(self.inner.vision_tower)
        self.score_layer = len(self.vision_layers) - 1  # last_hidden_state feeds the projector
        projector = self.inner.multi_modal_projector
        self.pool: nn.Module = projector.avg_pool
        self.patches_per_side: int = projector.patches_per_image
        self.side: int = projector.tokens_per_side
        self.tokens_per_image = model.config.mm_tokens_per_image
        self._bidirectional = False  # the current prefill's token_type_ids ask for image blocks

    # ---- per-forward facts ------------------------------------------------------------------------
    def image_layout(self, inner_kwargs: dict) -> ImageLayout | None:
        pixel_values = inner_kwargs.get("pixel_values")
        if pixel_values is not None:
            counts = [self.tokens_per_image] * int(pixel_values.shape[0])
        else:
            counts = self.precomputed_counts(inner_kwargs)
            if counts is None:
                return None
        self._bidirectional = self._check_token_types(inner_kwargs)
        grid = (self.side, self.side)
        return ImageLayout(counts=counts, grids=[grid if n == self.side**2 else None for n in counts])

    def _check_token_types(self, inner_kwargs: dict) -> bool:
        """True when token_type_ids are given (the model then builds bidirectional image blocks); they must
        mark exactly the image tokens, since the engine derives the blocks of a pruned sequence from them."""
        token_types, input_ids = inner_kwargs.get("token_type_ids"), inner_kwargs.get("input_ids")
        if token_types is None or input_ids is None:
            return False
        # a follow-up turn on a reused cache: transformers reads them by position from the conversation's start
        token_types = token_types[:, token_types.shape[1] - input_ids.shape[1] :]
        if not torch.equal(token_types == 1, self.visual_mask(input_ids)):
            raise UnsupportedInputError(
                "token_type_ids must be 1 exactly at the image tokens (as Gemma3Processor returns them): "
                "tokprune rebuilds Gemma 3's bidirectional image blocks of a pruned prompt from them"
            )
        return True

    # ---- language-model masks ---------------------------------------------------------------------
    def layer_mask(
        self,
        hidden_states: torch.Tensor,
        mask_2d: torch.Tensor,
        past_key_values,
        layer_idx: int,
        kind: str,
        tokens: TokenMap | None = None,
    ):
        """Gemma 3's mask for layers of type `kind` (sized against `layer_idx`'s cache), as
        `create_masks_for_vision_model` builds it: with `tokens` (a prefill, or a follow-up turn's new tokens
        after the cache that `mask_2d` also covers) each run of image tokens is a bidirectional block;
        sliding layers AND the window over OR(causal, block)."""
        if tokens is None or not self._bidirectional:
            return super().layer_mask(hidden_states, mask_2d, past_key_values, layer_idx, kind, tokens)
        blocks = get_block_sequence_ids_for_mask(tokens.image_id >= 0, device=hidden_states.device)  # (B, L)
        # a follow-up turn: the cached earlier turns come first (their image blocks are complete: the new
        # tokens attend to them causally)
        blocks = nn.functional.pad(blocks, (mask_2d.shape[1] - blocks.shape[1], 0), value=-1)
        common = dict(
            config=self.text_config,
            inputs_embeds=hidden_states,
            attention_mask=mask_2d,
            **{CACHE_KWARG: past_key_values},
            position_ids=None,
            layer_idx=layer_idx,
        )
        if kind == "sliding_attention":
            return create_causal_mask(
                **common,
                or_mask_function=blockwise_overlay(blocks),
                and_mask_function=sliding_window_overlay(self.text_config.sliding_window),
            )
        return create_causal_mask(**common, block_sequence_ids=blocks)

    # ---- vision signals ---------------------------------------------------------------------------
    def install_vision_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        by_layer = self.signals_by_layer(names, len(self.vision_layers), self.score_layer)
        by_layer = self.without_cls(by_layer)  # SigLIP has no [CLS]
        return self.hook_attention_layers(
            by_layer, self.vision_layers, lambda wanted, tap: self._hook(wanted, store, tap)
        )

    def pooled(self, values: torch.Tensor) -> torch.Tensor:
        """(n_img, P*P, C) per-patch values -> (n_img * T, C), averaged as the projector pools its input."""
        n_img, _, channels = values.shape
        side = self.patches_per_side
        grid = values.transpose(1, 2).reshape(n_img, channels, side, side)
        return self.pool(grid).flatten(2).transpose(1, 2).flatten(0, 1)

    # ---- features before the projector's norm ------------------------------------------------------
    def feature_rows(self, projector_input: torch.Tensor) -> torch.Tensor:
        """(n_img * T, C): the projector's own average pooling of its input (n_img, P*P, C), i.e. the pooled
        feature of every LLM token before `mm_soft_emb_norm`."""
        return self.pooled(projector_input)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """(m, C) pooled rows -> (m, D): the projector after its pooling (RMS norm, then the matmul)."""
        projector = self.projector
        normed = projector.mm_soft_emb_norm(rows)
        return torch.matmul(normed, projector.mm_input_projection_weight).type_as(rows)

    def _hook(self, wanted: dict[str, str], store: VisionSignalStore, tap: ProjectionTap):
        """Forward hook on one SigLIP attention module computing `wanted` ({full name: base name}), one
        value per LLM token, from the projections its forward made (`tap`). No [CLS]: "cls_attention" is
        the attention each patch receives."""

        def hook(module, args, kwargs, output):
            with timed(store.seconds, output[0].device), tap:
                hidden = kwargs.get("hidden_states", args[0] if args else None)  # (n_img, P*P, C), normed
                n_img, length, _ = hidden.shape
                heads = (n_img, length, -1, module.head_dim)
                keys = tap.output("k_proj", hidden).view(heads).transpose(1, 2)
                received = None
                for name, base in wanted.items():
                    if base == "vit_keys":  # head mean
                        value = self.pooled(keys.float().mean(1))
                    elif base == "vit_keys_concat":  # full width
                        value = self.pooled(logit_signal(base, keys, keys, module.scale))
                    elif base in LOGIT_SIGNALS:  # logit means over all patches
                        query = tap.output("q_proj", hidden).view(heads).transpose(1, 2)
                        per_patch = logit_signal(base, query, keys, module.scale)  # (n_img, P*P)
                        value = self.pooled(per_patch[..., None])[:, 0]
                    else:  # cls_attention / received_attention
                        if received is None:
                            query = tap.output("q_proj", hidden).view(heads).transpose(1, 2)
                            per_patch = torch.stack(
                                [received_attention(q, k, module.scale) for q, k in zip(query, keys)]
                            )  # (n_img, P*P)
                            received = self.pooled(per_patch[..., None])[:, 0]
                        value = received
                    store.values[name] = value

        return hook
