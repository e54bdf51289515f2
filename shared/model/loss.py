"""The training loss, computed on the silo (labels never leave it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits[:, t] predicts labels[:, t+1]; mean over labels != -100, fp32."""
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:].to(logits.device)
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # a batch with nothing to learn: zero loss, zero gradients, no NaN
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
