"""Signals of a decoder layer recomputed from its own projections (the model keeps running sdpa/flash).

The layouts follow transformers' attention modules: q_proj/k_proj, optional q_norm/k_norm (Qwen3, Gemma 3),
RoPE from the (cos, sin) the decoder layer receives, GQA through `num_key_value_groups`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokprune.signals.attention import attention_rows, last_query_attention


@dataclass
class KeyContext:
    """Keys a layer's current tokens also attend to, ahead of them: the KV cache of the earlier turns of a
    conversation (as they were pruned at this layer). keys: (B, H_kv, P, d) post-RoPE; mask: (B, P) bool."""

    keys: torch.Tensor
    mask: torch.Tensor

    @property
    def length(self) -> int:
        return self.mask.shape[1]


def _with_context(
    keys: torch.Tensor, key_mask: torch.Tensor, context: KeyContext | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(keys, key mask, offset of the current tokens) over the context followed by the current tokens."""
    if context is None:
        return keys, key_mask, 0
    keys = torch.cat([context.keys.to(keys.dtype), keys], dim=2)
    key_mask = torch.cat([context.mask.to(key_mask.device, torch.bool), key_mask], dim=1)
    return keys, key_mask, context.length


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, N, d); cos/sin: (B, N, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def keys_from_start(keys: torch.Tensor, position_embeddings, valid: torch.Tensor) -> torch.Tensor:
    """Post-RoPE keys (B, H_kv, N, d) turned back by the rotation of each row's first real token, i.e. as if
    the row were numbered from that token (what the authors' codes see: one unpadded row numbered 0, 1, ...):
    R(p - p_first) k = R(p_first)^-1 R(p) k. The same whatever offset the caller numbered a padded row from
    (a plain forward numbers a left-padded row from its padding, generate() from its first real token).

    position_embeddings: (cos, sin) (B, N, d) of the tokens; valid: (B, N) bool real tokens."""
    cos, sin = position_embeddings
    first = valid.long().argmax(1)[:, None]  # (B, 1) the first real slot
    cos0, sin0 = _take(cos, first), _take(sin, first)  # (B, 1, d)
    return _rope(keys, cos0.expand(-1, keys.shape[2], -1), -sin0.expand(-1, keys.shape[2], -1))


def _heads(attn: nn.Module, proj: nn.Module, norm_name: str, hidden: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, heads, N, head_dim) through `proj` and the module's optional per-head norm."""
    batch, length, _ = hidden.shape
    x = proj(hidden).view(batch, length, -1, attn.head_dim)
    norm = getattr(attn, norm_name, None)
    if norm is not None:
        x = norm(x)
    return x.transpose(1, 2)


def rotated_keys(attn: nn.Module, normed: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Post-RoPE keys of all tokens: (B, N, D) normed layer input -> (B, H_kv, N, d)."""
    cos, sin = position_embeddings
    return _rope(_heads(attn, attn.k_proj, "k_norm", normed), cos, sin)


def last_query_scores(
    attn: nn.Module,
    normed: torch.Tensor,
    position_embeddings,
    key_mask: torch.Tensor,
    keys: torch.Tensor | None = None,
    context: KeyContext | None = None,
) -> torch.Tensor:
    """Head-mean attention of each row's last real token over all tokens at this layer: (B, N) float32.

    normed: (B, N, D) the attention module's input (after input_layernorm); key_mask: (B, N) bool real
    tokens (the query is the last True of each row, so a right-padded batch scores like a left-padded
    one); keys: (B, H_kv, N, d) post-RoPE keys if already at hand (e.g. from the KV cache); context:
    cached keys the last token also attends to (its softmax runs over them too; they get no score).
    """
    cos, sin = position_embeddings
    last = last_real_index(key_mask)  # (B, 1)
    query = _rope(
        _heads(attn, attn.q_proj, "q_norm", _take(normed, last)), _take(cos, last), _take(sin, last)
    )
    if keys is None:
        keys = rotated_keys(attn, normed, position_embeddings)
    keys, key_mask, offset = _with_context(keys, key_mask, context)
    return last_query_attention(query, keys, attn.scaling, key_mask)[:, offset:]


def last_real_index(key_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1) position of each row's last real token (the last position for a row without any)."""
    length = key_mask.shape[1]
    positions = torch.arange(length, device=key_mask.device).expand_as(key_mask)
    last = torch.where(key_mask.bool(), positions, -1).amax(1, keepdim=True)
    return torch.where(last < 0, length - 1, last)


def cached_keys(past_key_values, layer_idx: int, length: int) -> torch.Tensor | None:
    """Post-RoPE keys (B, H_kv, L, d) of `layer_idx` from a cache holding exactly this prefill's tokens."""
    layers = getattr(past_key_values, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    keys = getattr(layers[layer_idx], "keys", None)
    if keys is None or keys.dim() != 4 or keys.shape[-2] != length:
        return None
    return keys


def cached_prefix(past_key_values, layer_idx: int, mask: torch.Tensor) -> KeyContext:
    """The first mask.shape[1] cached keys of `layer_idx` (the earlier turns), with their 2-D mask (B, P)."""
    keys = past_key_values.layers[layer_idx].keys
    return KeyContext(keys=keys[:, :, : mask.shape[1]], mask=mask.bool())


def _query_index(
    query_positions: list[torch.Tensor], key_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded query positions (B, T) and their validity (B, T) bool, T = max(1, longest list).

    A row with no positions queries with its last real token instead (DESIGN: never an empty score row).
    """
    batch, length = key_mask.shape
    last = last_real_index(key_mask)  # (B, 1)
    rows = [
        (positions if positions.numel() else last[row]).to(key_mask.device)
        for row, positions in enumerate(query_positions)
    ]
    width = max(1, max(int(p.numel()) for p in rows))
    index = torch.full((batch, width), length - 1, dtype=torch.long, device=key_mask.device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=key_mask.device)
    for row, positions in enumerate(rows):
        index[row, : positions.numel()] = positions
        valid[row, : positions.numel()] = True
    return index, valid


def text_query_scores(
    attn: nn.Module,
    normed: torch.Tensor,
    position_embeddings,
    query_positions: list[torch.Tensor],
    key_mask: torch.Tensor,
    keys: torch.Tensor | None = None,
    context: KeyContext | None = None,
) -> torch.Tensor:
    """Attention the chosen query tokens of each row (e.g. its instruction) pay every token: (B, N, T).

    normed: (B, N, D) the attention module's input; query_positions: per row, ascending positions of its
    query tokens (a row without any uses its last real token); key_mask: (B, N) bool real tokens; keys:
    (B, H_kv, N, d) post-RoPE keys if at hand; context: cached keys every query also attends to (in its
    softmax; they get no score). Entry [b, j, t] = head mean over the softmax row of query t (over all
    real keys up to its own position) at key j; columns t >= len(query_positions[b]) are 0 (except column
    0 of a row without queries). Keys come first so that token slices give rows (n, T).
    """
    cos, sin = position_embeddings
    index, valid = _query_index(query_positions, key_mask)
    query = _rope(
        _heads(attn, attn.q_proj, "q_norm", _take(normed, index)), _take(cos, index), _take(sin, index)
    )
    if keys is None:
        keys = rotated_keys(attn, normed, position_embeddings)
    keys, key_mask, offset = _with_context(keys, key_mask, context)
    weights = attention_rows(query, keys, attn.scaling, index + offset, key_mask)[..., offset:]  # (B, T, N)
    return (weights * valid[..., None]).transpose(1, 2)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) at positions index (B, T): (B, T, D); a table shared by the rows (1, N, D) too."""
    x = x.expand(index.shape[0], -1, -1)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def visual_received_scores(
    attn: nn.Module,
    normed: torch.Tensor,
    position_embeddings,
    image_id: torch.Tensor,
    key_mask: torch.Tensor,
    keys: torch.Tensor | None = None,
    chunk: int = 64,
    context: KeyContext | None = None,
) -> torch.Tensor:
    """Attention each visual token receives from the visual tokens of its own image: (B, N) float32.

    normed: (B, N, D) the attention module's input; image_id: (B, N) image of every token (-1: text and
    padding); key_mask: (B, N) bool real tokens; keys: (B, H_kv, N, d) post-RoPE keys if at hand; context:
    cached keys every query also attends to (in its softmax; they get no score). Entry [b, j] of a visual
    token j = the mean, over the real tokens i of j's image in row b, of the head-mean causal softmax row
    of query i (over all real keys up to i, as a causal decoder computes it) at key j; 0 for text and
    padding. Streams over `chunk` visual queries: memory O(H * chunk * N), never N x N.
    """
    batch, length, _ = normed.shape
    cos, sin = position_embeddings
    if keys is None:
        keys = rotated_keys(attn, normed, position_embeddings)
    all_keys, all_mask, offset = _with_context(keys, key_mask, context)
    visual = (image_id >= 0) & key_mask
    per_row = visual.sum(1)
    n_queries = max(1, int(per_row.max()))
    index = torch.zeros(batch, n_queries, dtype=torch.long, device=normed.device)
    valid = torch.arange(n_queries, device=normed.device) < per_row[:, None]  # (B, T)
    for row in range(batch):
        index[row, : int(per_row[row])] = visual[row].nonzero().squeeze(1)
    received = torch.zeros(batch, length, dtype=torch.float32, device=normed.device)
    for t0 in range(0, n_queries, chunk):
        idx, ok = index[:, t0 : t0 + chunk], valid[:, t0 : t0 + chunk]  # (B, c)
        query = _rope(
            _heads(attn, attn.q_proj, "q_norm", _take(normed, idx)), _take(cos, idx), _take(sin, idx)
        )
        probs = attention_rows(query, all_keys, attn.scaling, idx + offset, all_mask)[
            ..., offset:
        ]  # (B, c, N)
        same = (image_id.gather(1, idx)[..., None] == image_id[:, None, :]) & ok[..., None]
        received += (probs * same).sum(1)
    ids = image_id.clamp(min=0)
    per_image = torch.zeros(batch, int(image_id.max()) + 2, device=normed.device)
    per_image.scatter_add_(1, ids, visual.float())  # real tokens of every image in the row
    count = per_image.gather(1, ids).clamp(min=1)
    return torch.where(visual, received / count, torch.zeros_like(received))


def input_text_relevance(
    embeds: torch.Tensor, image_id: torch.Tensor, instruction: list[torch.Tensor]
) -> torch.Tensor:
    """How much each instruction token relates to each image, from the LLM-input embeddings: (B, L, T).

    embeds: (B, L, D) the LLM input; image_id: (B, L) image of every visual token (-1 elsewhere);
    instruction: per row, ascending positions of its instruction tokens (T = max(1, longest)). For an
    image I of row b with visual tokens v and instruction tokens t = 1..m: r_t = mean over v in I of
    softmax over t of <h_v, h_t> (SparseVLM's Eq. 4, unscaled dot products in float32). Every visual
    token of I carries r (m,) in its columns :m (0 after); text and padding rows are 0. A row without
    instruction tokens has r = (1,) in column 0 (its last token is the one rater). The value of a token is
    its image's, so it survives any later pruning of the image's other tokens.
    """
    batch, length, _ = embeds.shape
    width = max(1, max(int(p.numel()) for p in instruction))
    out = torch.zeros(batch, length, width, dtype=torch.float32, device=embeds.device)
    for row in range(batch):
        text = embeds[row, instruction[row].to(embeds.device)].float()  # (m, D)
        ids = image_id[row]
        for image in ids[ids >= 0].unique().tolist():
            where = (ids == image).nonzero().squeeze(1)
            if text.shape[0] == 0:
                out[row, where, 0] = 1.0
                continue
            logits = embeds[row, where].float() @ text.T  # (n, m)
            out[row, where, : text.shape[0]] = logits.softmax(dim=1).mean(0)
    return out


# signals an in-LLM method may read that are computed once, on the LLM input (after any pre-LLM stage):
# name -> function(embeds (B, L, D), image_id (B, L), instruction positions per row) -> (B, L, ...)
INPUT_SIGNALS = {"input_text_relevance": input_text_relevance}

# signals made of attention rows (queries against the layer's post-RoPE keys)
ATTENTION_ROWS = {"last_query_attention", "text_query_attention", "visual_attention"}
NEEDS_KEYS = ATTENTION_ROWS | {"keys", "keys_mean", "keys_from_start"}


def layer_signals(
    wanted: set[str],
    attn: nn.Module,
    normed: torch.Tensor,
    position_embeddings,
    past_key_values,
    valid: torch.Tensor,
    image_id: torch.Tensor,
    instruction: list[torch.Tensor],
    context: KeyContext | None = None,
) -> dict[str, torch.Tensor]:
    """The requested LLM signals of one attention module's input normed (B, L, D).

    valid: (B, L) real tokens; image_id: (B, L) image of each visual token (-1 elsewhere); instruction:
    per row, positions of the text after the row's images; context: the cached keys of earlier turns the
    current tokens attend to (a follow-up turn on a reused cache; None for a prefill). Keys come from the
    KV cache when it holds exactly the context and this sequence, else from the module's own projections.
    Returns, as asked: "last_query_attention" (B, L), "text_query_attention" (B, L, T) (the instruction's
    rows, keys first), "visual_attention" (B, L) (received from the visual tokens of the same image),
    "keys" (B, L, H_kv*d), "keys_mean" (B, L, d) (the KV heads averaged), "keys_from_start" (B, L, H_kv*d)
    (`keys_from_start`: as if each row were numbered from its first real token). Attention rows run their
    softmax over the context too; it gets no score.
    """
    prefix = context.length if context is not None else 0
    keys = cached_keys(past_key_values, attn.layer_idx, prefix + normed.shape[1])
    if keys is not None:
        keys = keys[:, :, prefix:]
    elif wanted & NEEDS_KEYS:
        keys = rotated_keys(attn, normed, position_embeddings)
    out = {}
    if "last_query_attention" in wanted:
        out["last_query_attention"] = last_query_scores(
            attn, normed, position_embeddings, valid, keys=keys, context=context
        )
    if "text_query_attention" in wanted:
        out["text_query_attention"] = text_query_scores(
            attn, normed, position_embeddings, instruction, valid, keys=keys, context=context
        )
    if "visual_attention" in wanted:
        out["visual_attention"] = visual_received_scores(
            attn, normed, position_embeddings, image_id, valid, keys=keys, context=context
        )
    if "keys" in wanted:
        out["keys"] = keys.transpose(1, 2).flatten(2)  # heads concatenated
    if "keys_mean" in wanted:
        out["keys_mean"] = keys.float().mean(1)  # head mean
    if "keys_from_start" in wanted:
        out["keys_from_start"] = (
            keys_from_start(keys.float(), position_embeddings, valid).transpose(1, 2).flatten(2)
        )
    return out
