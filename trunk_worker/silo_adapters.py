"""Hierarchical mode: one trunk adapter per silo over ONE shared frozen trunk base.

The trunk module carries a single set of adapter slots (LoRA A/B, or prefix K/V, per block).
Each silo owns its own Parameter objects for those slots and its own optimizer; serving a silo
means putting its Parameters into the slots (a dict assignment per tensor, no copy). Autograd
keeps the Parameters each forward used, so interleaved steps of different silos stay separate.
Memory grows by one adapter and its optimizer state per silo, never by a copy of the base.

Each silo's adapter and its AdamW moments live in ONE flat buffer (parameters | exp_avg |
exp_avg_sq), the Parameters and moments being views into it: one allocation per silo instead of
hundreds of small ones that the allocator scatters between a step's activations, so sixteen silos
cost sixteen adapters' state and not that plus heap fragmentation. AdamW finds its state already
there (zeros, step 0: what it would have made itself), so the arithmetic is unchanged.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from shared.optim import make_optimizer

log = logging.getLogger("trunk")


class SiloAdapters:
    def __init__(self, trunk: nn.Module, lr: float, weight_decay: float) -> None:
        self.slots: list[tuple[nn.Module, str, str]] = []  # (owner module, attribute, full name)
        for name, p in trunk.named_parameters():
            if p.requires_grad:
                owner, _, attr = name.rpartition(".")
                self.slots.append((trunk.get_submodule(owner), attr, name))
        if not self.slots:
            raise ValueError("hierarchical mode needs a trunk adapter (LoRA or prefix), not a frozen trunk")
        # The state new silos start from: the initial adapter, later the last round's average.
        self.template = [owner._parameters[attr].detach().clone() for owner, attr, _ in self.slots]
        self.lr, self.weight_decay = lr, weight_decay
        self.params: dict[str, list[nn.Parameter]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.flat: dict[str, torch.Tensor] = {}  # silo -> its adapter's parameters, flattened (views of one buffer)
        self.active: str | None = None

    @property
    def names(self) -> list[str]:
        return [name for _, _, name in self.slots]

    def activate(self, silo: str) -> torch.optim.Optimizer:
        """Put ``silo``'s adapter into the trunk; returns its optimizer."""
        if silo not in self.params:
            self._create(silo)
            log.info("trunk adapter for %s created (%d silos on this worker)", silo, len(self.params))
        if self.active != silo:
            for (owner, attr, _), p in zip(self.slots, self.params[silo]):
                owner._parameters[attr] = p
            self.active = silo
        return self.optimizers[silo]

    def _create(self, silo: str) -> None:
        numel = sum(t.numel() for t in self.template)
        t0 = self.template[0]
        flat = torch.empty(3 * numel, dtype=t0.dtype, device=t0.device)
        params_flat, exp_avg, exp_avg_sq = flat[:numel], flat[numel:2 * numel], flat[2 * numel:]
        exp_avg.zero_(), exp_avg_sq.zero_()
        params, offset = [], 0
        with torch.no_grad():
            for t in self.template:
                view = params_flat[offset:offset + t.numel()].view_as(t)
                view.copy_(t)
                params.append(nn.Parameter(view))
                offset += t.numel()
        optimizer = make_optimizer(params, self.lr, self.weight_decay)
        if isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults["amsgrad"]:
            offset = 0
            for p in params:
                n = p.numel()
                optimizer.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                      "exp_avg": exp_avg[offset:offset + n].view_as(p),
                                      "exp_avg_sq": exp_avg_sq[offset:offset + n].view_as(p)}
                offset += n
        self.params[silo], self.optimizers[silo], self.flat[silo] = params, optimizer, params_flat

    def forget_all(self) -> None:
        """Drop every silo's adapter (a rollback re-creates them from a checkpoint)."""
        self.params.clear()
        self.optimizers.clear()
        self.flat.clear()
        self.active = None

    def weighted_sum(self, weights: dict[str, int]) -> tuple[torch.Tensor, float]:
        """sum_s n_s * theta_s over the given silos held here (float64, flattened), and sum_s n_s."""
        held = [s for s in sorted(weights) if s in self.params]
        total = torch.zeros(sum(t.numel() for t in self.template), dtype=torch.float64)
        for s in held:  # in place: no float64 copy of each silo's adapter (the product is exact either way)
            total.add_(self.flat[s].detach().cpu(), alpha=weights[s])
        return total, float(sum(weights[s] for s in held))

    def set_all(self, average: torch.Tensor) -> None:
        """Every silo's adapter (and the template for newcomers) becomes the round's average."""
        offset = 0
        with torch.no_grad():
            for i, t in enumerate(self.template):
                piece = average[offset:offset + t.numel()].view_as(t).to(device=t.device, dtype=t.dtype)
                t.copy_(piece)
                for params in self.params.values():
                    params[i].copy_(piece)
                offset += t.numel()
