"""Micro-batches: one step's batch cut into N pieces whose weighted losses add up to the batch loss.

``causal_lm_loss`` is the mean over the batch's labelled tokens, so micro-batch i's loss is scaled
by (its labelled tokens / the batch's): the accumulated gradients are then those of the whole
batch (up to float rounding of the different summation order). The silo and every reference cut
the batch with this one function, so they accumulate exactly the same pieces.
"""

from __future__ import annotations

import torch

from shared.data.dataset import Batch
from shared.model.loss import IGNORE_INDEX


def split_batch(batch: Batch, n: int) -> list[tuple[Batch, float]]:
    """``n`` row blocks of the batch (sizes differ by at most one), each with its loss weight."""
    rows = batch.input_ids.shape[0]
    if not 1 <= n <= rows:
        raise ValueError(f"{n} micro-batches of a {rows}-example batch: need 1 <= micro-batches <= batch size")
    if n == 1:
        return [(batch, 1.0)]
    counted = (batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)  # what causal_lm_loss averages over
    total = int(counted.sum())
    pieces = []
    for ids, mask, labels, c in zip(*(torch.tensor_split(t, n) for t in (batch.input_ids, batch.attention_mask,
                                                                          batch.labels, counted))):
        weight = int(c.sum()) / total if total else 1.0 / n
        pieces.append((Batch(input_ids=ids, attention_mask=mask, labels=labels), weight))
    return pieces
