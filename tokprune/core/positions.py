"""Original positions of a follow-up turn on a reused cache, where transformers numbers them otherwise.

On M-RoPE models (Qwen-VL) transformers gives the new tokens of a turn that continues a cache plain text
positions (the 2-D mask's count plus the prompt's `rope_deltas`), also to the images the turn brings, which
the whole conversation would give 3-D rows. The engine renumbers such a turn with the adapter's M-RoPE
rows and keeps the difference (`shift`) for every later step, whose positions transformers still counts
its own way.
"""

from __future__ import annotations

import torch


def first_position(
    given: torch.Tensor | None, mask: torch.Tensor, length: int, rope_deltas: torch.Tensor | None
) -> torch.Tensor:
    """(B,) transformers' position of each row's first new token (a text token: it numbers text alike).

    given: the position ids passed with the turn, (B, L) or (rows, B, L), or None; mask: (B, P + L) 2-D
    mask of the whole unpruned conversation; length: L; rope_deltas: (B, 1) the model's, or None.
    """
    if given is not None:
        return (given if given.dim() == 2 else given[-1])[:, 0]
    first = mask[:, : mask.shape[1] - length + 1].long().sum(1) - 1
    return first + (rope_deltas.view(-1).to(first.device) if rope_deltas is not None else 0)


def with_rows(given: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """The positions to pass on: M-RoPE `rows` (3, B, L), behind the text row where `given` had one."""
    if given is not None and given.dim() == 3 and given.shape[0] == rows.shape[0] + 1:
        return torch.cat([given[:1], rows.to(given.dtype)], dim=0)
    return rows


def shifted(given: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """given (B, L) or (rows, B, L) + shift (B,) on its M-RoPE rows (a leading text row stays as it is)."""
    if given.dim() == 2:
        return given + shift[:, None].to(given)
    moved = given + shift[None, :, None].to(given)
    if given.shape[0] == 4:  # text row first (transformers' packed-sequence layout)
        moved[0] = given[0]
    return moved


def layer_position_ids(position_ids: torch.Tensor | None, config) -> torch.Tensor | None:
    """The position ids a decoder layer gets in a forward tokprune manages (positions of kept tokens,
    gapped where tokens were dropped): `position_ids` itself, or None under flash attention.

    A decoder layer takes its RoPE from `position_embeddings`; its `position_ids` only reach the attention
    function, and of transformers' implementations only flash attention reads them: for a batch of one
    row without padding (its all-ones mask is dropped) it treats position ids that are not one increasing
    run as packed sequences and sets the keys' cumulative lengths to the queries'. On a non-empty cache
    (a follow-up turn, a prefix cache) the new tokens then attend to the first cache slots instead of the
    cache and themselves. tokprune's rows are always one sequence each, so under flash attention the
    layers get no position ids and flash attends each row as one causal sequence (bottom-right aligned on
    the cache), as sdpa and eager do with the explicit mask.
    """
    if "flash" in (getattr(config, "_attn_implementation", None) or ""):
        return None
    return position_ids
