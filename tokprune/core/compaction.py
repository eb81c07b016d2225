"""Sequence compaction: keep a subset of positions per batch row, re-packed with left padding.

Kept tokens keep their order (unless a sort key reorders them: `apply(order="selection")`) and their
position ids (original ones unless `apply(positions="contiguous")` renumbers them); rows that keep different numbers of
tokens are right-aligned (left padding), which is what decoding with a KV cache expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Compaction:
    """Where the kept tokens come from.

    index: (B, L') source position of each output slot (0 in padding slots).
    valid: (B, L') True where the slot holds a kept token, False for left padding.
    """

    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_keep(cls, keep: torch.Tensor, key: torch.Tensor | None = None) -> Compaction:
        """keep: (B, L) bool -> compaction with L' = max kept per row, kept tokens right-aligned.

        key: (B, L) or None: the kept tokens of a row are laid out by ascending key (ties: source order);
        None keeps the source order (key = position)."""
        batch, length = keep.shape
        n_kept = keep.sum(1)
        new_len = int(n_kept.max())
        src = torch.arange(length, device=keep.device)[None].expand(batch, length)
        if key is not None:  # sort each row's kept tokens by key, dropped ones last
            last = key.max() + 1 if key.numel() else 0
            src = torch.sort(torch.where(keep, key, last), dim=1, stable=True).indices
            keep = torch.gather(keep, 1, src)
        slot = keep.long().cumsum(1) - 1 + (new_len - n_kept)[:, None]  # (B, L) output slot of each source
        index = torch.zeros(batch, new_len, dtype=torch.long, device=keep.device)
        valid = torch.zeros(batch, new_len, dtype=torch.bool, device=keep.device)
        rows = torch.arange(batch, device=keep.device)[:, None].expand(batch, length)
        index[rows[keep], slot[keep]] = src[keep]
        valid[rows[keep], slot[keep]] = True
        return cls(index=index, valid=valid)

    def then(self, later: Compaction) -> Compaction:
        """This compaction followed by `later` (which indexes this one's output), as one compaction of this
        one's source: index (B, L'') into the source, valid = later.valid."""
        index = later.take(self.index).masked_fill(~later.valid, 0)
        return Compaction(index=index, valid=later.valid)

    @property
    def lengths(self) -> list[int]:
        """Real tokens per row after compaction."""
        return self.valid.sum(1).tolist()

    def take(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Gather dim `dim` of x, whose leading dims are (..., B or 1, L, ...) with B at `dim - 1`."""
        batch = self.index.shape[0]
        shape = list(x.shape)
        shape[dim - 1] = batch
        x = x.expand(*shape)
        view = [1] * x.dim()
        view[dim - 1], view[dim] = self.index.shape
        index = self.index.view(view)
        expand = list(x.shape)
        expand[dim] = self.index.shape[1]
        return torch.gather(x, dim, index.expand(*expand))

    def take_mask(self, mask: torch.Tensor | None) -> torch.Tensor:
        """2-D padding mask (B, L) or None -> (B, L') long mask, 0 in padding slots."""
        if mask is None:
            return self.valid.long()
        return (self.take(mask).bool() & self.valid).to(mask.dtype)

    def take_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids (B|1, L) or (P, B|1, L) (M-RoPE rows) -> same layout with L', 0 in padding slots."""
        if position_ids.dim() == 2:
            return self.take(position_ids).masked_fill(~self.valid, 0)
        return self.take(position_ids, dim=2).masked_fill(~self.valid[None], 0)
