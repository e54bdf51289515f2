"""Hierarchical mode: one trunk adapter per silo over ONE shared frozen trunk base.

The trunk module carries a single set of adapter slots (LoRA A/B, or prefix K/V, per block).
Each silo owns its own Parameter objects for those slots and its own optimizer; serving a silo
means putting its Parameters into the slots (a dict assignment per tensor, no copy). Autograd
keeps the Parameters each forward used, so interleaved steps of different silos stay separate.
Memory grows by one adapter and its optimizer state per silo, never by a copy of the base.

Each silo's adapter and its AdamW moments live in ONE flat buffer (parameters | exp_avg |
exp_avg_sq), the Parameters and moments being views into it, and its AdamW step counts in one
small vector: two allocations per silo instead of hundreds of small ones that the allocator
scatters between a step's activations, so sixteen silos cost sixteen adapters' state and not that
plus heap fragmentation. AdamW finds its state already there (zeros, step 0: what it would have
made itself), so the arithmetic is unchanged. Checkpoints and the round's average read and write
those buffers whole (see ``state_of`` / ``load_state`` / ``weighted_sum``), never tensor by tensor.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from shared.model.optim import make_optimizer

log = logging.getLogger("trunk")

TEMPLATE = "\0template"  # the key of the installed template (no silo id can hold a NUL)
SUM_CHUNK = 1 << 16  # elements widened to float64 at a time by weighted_sum (512 KiB of scratch)


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
        first = self.slots[0][0]._parameters[self.slots[0][1]]
        self.numel = sum(owner._parameters[attr].numel() for owner, attr, _ in self.slots)
        self.template_flat = torch.empty(self.numel, dtype=first.dtype, device=first.device)
        self.template = _views(self.template_flat, [owner._parameters[attr] for owner, attr, _ in self.slots])
        with torch.no_grad():
            for t, (owner, attr, _) in zip(self.template, self.slots):
                t.copy_(owner._parameters[attr])
        # What a silo that does not train here generates through (views: they follow set_all).
        self.template_params = [nn.Parameter(t, requires_grad=False) for t in self.template]
        self.lr, self.weight_decay = lr, weight_decay
        self.params: dict[str, list[nn.Parameter]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.buffers: dict[str, torch.Tensor] = {}  # silo -> parameters | exp_avg | exp_avg_sq, one buffer
        self.steps: dict[str, torch.Tensor] = {}  # silo -> AdamW's step count of each parameter
        self.active: str | None = None
        self.averaged = False  # whether the template is a round's average (not just the initial adapter)

    @property
    def flat(self) -> dict[str, torch.Tensor]:
        """silo -> its adapter's parameters, flattened (the first third of its buffer)."""
        return {silo: buf[:self.numel] for silo, buf in self.buffers.items()}

    @property
    def names(self) -> list[str]:
        return [name for _, _, name in self.slots]

    def activate(self, silo: str) -> torch.optim.Optimizer:
        """Put ``silo``'s adapter into the trunk; returns its optimizer."""
        if silo not in self.params:
            self._create(silo)
            log.info("trunk adapter for %s created (%d silos on this worker)", silo, len(self.params))
        self._install(silo, self.params[silo])
        return self.optimizers[silo]

    def activate_for_generation(self, silo: str) -> None:
        """Put the adapter ``silo`` generates with into the trunk: its own when it trains on this
        worker, else the template (the last round's average, what it would start from here).
        Generation trains nothing, so no adapter or optimizer state is created for it."""
        if silo in self.params:
            self._install(silo, self.params[silo])
        else:
            self._install(TEMPLATE, self.template_params)

    def _install(self, key: str, params: list[nn.Parameter]) -> None:
        if self.active != key:
            for (owner, attr, _), p in zip(self.slots, params):
                owner._parameters[attr] = p
            self.active = key

    def _create(self, silo: str) -> None:
        n = self.numel
        buffer = torch.empty(3 * n, dtype=self.template_flat.dtype, device=self.template_flat.device)
        buffer[n:].zero_()  # the moments start at zero, as AdamW would start them
        with torch.no_grad():
            buffer[:n].copy_(self.template_flat)
        params = [nn.Parameter(v) for v in _views(buffer[:n], self.template)]
        optimizer = make_optimizer(params, self.lr, self.weight_decay)
        if not isinstance(optimizer, torch.optim.AdamW) or optimizer.defaults["amsgrad"]:
            raise TypeError(f"per-silo trunk state is laid out for AdamW, got {type(optimizer).__name__}")
        steps = torch.zeros(len(params), dtype=torch.float32)
        exp_avg, exp_avg_sq = _views(buffer[n:2 * n], params), _views(buffer[2 * n:], params)
        for i, p in enumerate(params):  # AdamW's own state layout, as views: it increments step in place
            optimizer.state[p] = {"step": steps[i], "exp_avg": exp_avg[i], "exp_avg_sq": exp_avg_sq[i]}
        self.params[silo], self.optimizers[silo] = params, optimizer
        self.buffers[silo], self.steps[silo] = buffer, steps

    def state_of(self, silo: str) -> dict[str, torch.Tensor]:
        """A silo's whole trunk state for a checkpoint: two tensors, no copies."""
        return {"buffer": self.buffers[silo], "steps": self.steps[silo]}

    def load_state(self, silo: str, buffer: torch.Tensor, steps: torch.Tensor) -> None:
        """Restore a silo's state from ``state_of``'s tensors, into its own buffers (in place)."""
        self.activate(silo)
        if buffer.shape != self.buffers[silo].shape or steps.shape != self.steps[silo].shape:
            raise ValueError(f"checkpointed trunk state of {silo} has shapes {tuple(buffer.shape)}, {tuple(steps.shape)};"
                             f" this trunk's adapter needs {tuple(self.buffers[silo].shape)}, {tuple(self.steps[silo].shape)}")
        with torch.no_grad():
            self.buffers[silo].copy_(buffer)
            self.steps[silo].copy_(steps)
        self.optimizers[silo].zero_grad(set_to_none=True)

    def forget_all(self) -> None:
        """Drop every silo's adapter (a rollback re-creates them from a checkpoint)."""
        self.params.clear()
        self.optimizers.clear()
        self.buffers.clear()
        self.steps.clear()
        self.active = None

    def weighted_sum(self, weights: dict[str, int]) -> tuple[torch.Tensor, float]:
        """sum_s n_s * theta_s over the given silos held here (float64, flattened), and sum_s n_s."""
        held = [s for s in sorted(weights) if s in self.params]
        total = torch.zeros(self.numel, dtype=torch.float64)
        # A float32 buffer added into float64 makes torch allocate a float64 copy of the whole adapter
        # per silo, which the heap keeps at the worker's fullest moment: widen a chunk at a time into
        # one small scratch instead. Same float64 additions in the same order: the same sum.
        scratch = torch.empty(min(SUM_CHUNK, self.numel), dtype=torch.float64)
        for start in range(0, self.numel, SUM_CHUNK):
            piece = total[start:start + SUM_CHUNK]
            wide = scratch[:piece.numel()]
            for s in held:
                wide.copy_(self.buffers[s][start:start + piece.numel()])
                piece.add_(wide, alpha=weights[s])
        return total, float(sum(weights[s] for s in held))

    def set_all(self, average: torch.Tensor) -> None:
        """Every silo's adapter (and the template for newcomers) becomes the round's average."""
        self.averaged = True
        with torch.no_grad():
            self.template_flat.copy_(average)  # float64 -> the adapter's dtype, rounded once
            for buffer in self.buffers.values():
                buffer[:self.numel].copy_(self.template_flat)


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of ``flat`` shaped like each tensor of ``like``."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out
