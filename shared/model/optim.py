"""The optimizer every part uses, built the same way on silo, trunk and the in-process reference."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer | None:
    params = _unique(params)
    if not params:
        return None  # a frozen part (e.g. the trunk when only the silo's parts train)
    # foreach=False: the same per-tensor kernels everywhere, so split and reference round alike.
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


def _unique(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Tied weights (embedding = LM head) appear in both silo parts: optimise them once."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
