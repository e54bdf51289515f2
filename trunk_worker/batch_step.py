"""Client-batch mode on the trunk: one forward and one backward for several silos' steps.

A BUNDLE's members are opened one by one (each with its own silo's session), padded to a common
length and concatenated along the batch (shared/model/batching.py). One forward keeps the graph; each
silo gets its slice of the output. Gradients come back per silo; when all are in, or when the
straggler timeout passes, one backward runs with zeros for the missing slices. The trunk's gradients
are averaged over the silos that contributed, and the optimizer stepped, by the caller
(trunk_worker/client_batch_steps.py): with micro-batches one update adds up several batches.

With micro-batches a silo has several open batches in one step, one per piece, in piece order: its
k-th gradient of the step belongs to its k-th open batch (it sends them in order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from shared.model.batching import RowSlice, concat_padded, scatter_grads, take
from shared.wire.wire import Message


@dataclass
class OpenBundle:
    members: list[Message]  # their FORWARDs, in bundle order
    slices: list[RowSlice]
    h1: torch.Tensor
    h2: torch.Tensor
    deadline: float
    forward_s: float
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    backwards: dict[str, Message] = field(default_factory=dict)

    @property
    def silos(self) -> list[str]:
        return [m.silo_id for m in self.members]

    def complete(self) -> bool:
        return len(self.grads) == len(self.members)


class BatchSteps:
    """Open bundles by (silo, step) of each member."""

    def __init__(self, trunk, device, compute_dtype, straggler_timeout_s: float) -> None:
        self.trunk, self.device, self.compute_dtype = trunk, device, compute_dtype
        self.straggler_timeout_s = straggler_timeout_s
        self.by_member: dict[tuple[str, int], list[OpenBundle]] = {}  # (silo, step) -> its open batches

    def forward(self, members: list[Message]) -> tuple[OpenBundle, list[torch.Tensor]]:
        started = time.perf_counter()
        hidden, mask, pos, slices = concat_padded([m.tensors[0].to(self.compute_dtype) for m in members],
                                                  [m.tensors[1].to(torch.long) for m in members],
                                                  [m.tensors[2].to(torch.long) for m in members])
        h1 = hidden.to(self.device).requires_grad_(True)
        with torch.enable_grad():
            h2 = self.trunk(h1, mask.to(self.device), pos.to(self.device))
        bundle = OpenBundle(members, slices, h1, h2, time.monotonic() + self.straggler_timeout_s,
                            time.perf_counter() - started)
        for m in members:
            self.by_member.setdefault((m.silo_id, m.step), []).append(bundle)
        return bundle, [take(h2.detach(), s) for s in slices]

    def _awaiting(self, msg: Message) -> OpenBundle | None:
        """The silo's oldest open batch of the step that has no gradient from it yet."""
        return next((b for b in self.by_member.get((msg.silo_id, msg.step), ()) if msg.silo_id not in b.grads), None)

    def add_grad(self, msg: Message) -> OpenBundle | None:
        """Record a silo's dL/dh2 slice; returns its batch."""
        bundle = self._awaiting(msg)
        if bundle is None:
            return None
        bundle.grads[msg.silo_id] = msg.tensors[0]
        bundle.backwards[msg.silo_id] = msg
        return bundle

    def expired(self, now: float | None = None) -> list[OpenBundle]:
        now = time.monotonic() if now is None else now
        return list({id(b): b for bs in self.by_member.values() for b in bs if b.deadline <= now}.values())

    def close(self, bundle: OpenBundle) -> None:
        """The batch is done (backward run, or nothing came back): no gradient goes to it any more."""
        for m in bundle.members:
            key = (m.silo_id, m.step)
            open_ = [b for b in self.by_member.get(key, ()) if b is not bundle]
            if open_:
                self.by_member[key] = open_
            else:
                self.by_member.pop(key, None)

    def backward(self, bundle: OpenBundle) -> dict[str, torch.Tensor]:
        """One backward over the whole batch (the trunk's gradients accumulate, unscaled); returns
        dL/dh1 per contributing silo."""
        self.close(bundle)
        grads = [bundle.grads.get(m.silo_id) for m in bundle.members]
        full = scatter_grads([None if g is None else g.to(self.device, bundle.h2.dtype) for g in grads],
                             bundle.slices, bundle.h2)
        bundle.h2.backward(full)
        return {m.silo_id: take(bundle.h1.grad, s) for m, s in zip(bundle.members, bundle.slices)
                if m.silo_id in bundle.grads}

    def shape_ok(self, msg: Message) -> bool:
        bundle = self._awaiting(msg)
        if bundle is None:
            return False
        s = bundle.slices[bundle.silos.index(msg.silo_id)]
        want = (s.rows, s.length, bundle.h2.shape[-1])
        return tuple(msg.tensors[0].shape) == want
