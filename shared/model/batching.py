"""One trunk batch from several silos' steps: right-pad to a common length, concatenate, split back.

Used by the trunk worker in client-batch mode and by the single-process reference, so both build
bit-identical trunk batches. Right padding keeps every row's positions and causal attention as
they were: the added columns are masked keys, and the rows' outputs there are cut off again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowSlice:
    """Where one member's [b, t] sits inside the [sum b, max t] batch."""

    start: int
    rows: int
    length: int


def concat_padded(hiddens: list[torch.Tensor], masks: list[torch.Tensor], positions: list[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[RowSlice]]:
    """Members may differ in batch size and sequence length; hidden sizes must agree."""
    if not hiddens:
        raise ValueError("an empty trunk batch")
    width = max(h.shape[1] for h in hiddens)
    slices, start = [], 0
    for h in hiddens:
        slices.append(RowSlice(start, h.shape[0], h.shape[1]))
        start += h.shape[0]
    pad = [width - h.shape[1] for h in hiddens]
    hidden = torch.cat([torch.nn.functional.pad(h, (0, 0, 0, p)) for h, p in zip(hiddens, pad)])
    mask = torch.cat([torch.nn.functional.pad(m, (0, p)) for m, p in zip(masks, pad)])
    pos = torch.cat([torch.nn.functional.pad(q, (0, p)) for q, p in zip(positions, pad)])
    return hidden, mask, pos, slices


def take(batch: torch.Tensor, s: RowSlice) -> torch.Tensor:
    """Member ``s``'s rows and columns of a [sum b, max t, ...] tensor."""
    return batch[s.start:s.start + s.rows, :s.length]


def scatter_grads(grads: list[torch.Tensor | None], slices: list[RowSlice], like: torch.Tensor) -> torch.Tensor:
    """The batch gradient from the members' slices; a missing member (straggler) contributes zeros."""
    full = torch.zeros_like(like)
    for g, s in zip(grads, slices):
        if g is not None:
            full[s.start:s.start + s.rows, :s.length] = g
    return full
