"""The trunk's side of split generation: one KV cache per silo, bounded, freed on END or when idle.

A GENERATE with step 0 carries a prompt's h1 and opens a fresh cache for its silo (replacing any
older one); each later step must be the next token of that generation and carries one position.
Caches are bounded three ways, so a silo that vanishes mid-generation cannot pin memory: at most
``max_sessions`` silos at once (the least recently used goes), at most ``max_tokens`` positions in
one cache, and ``idle_s`` seconds without a step. No autograd: generation never trains.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from shared.model.generation import PartSession
from shared.model.model_split import TrunkPart
from shared.wire.protocol import Kind
from shared.wire.wire import Message
from trunk_worker.step_error import StepError

log = logging.getLogger("trunk")


class GenerationError(StepError):
    """A well-formed generation frame that cannot be served; ``reason`` is the counter name."""


@dataclass
class _Generation:
    session: PartSession
    next_step: int = 0
    last_used: float = field(default_factory=time.monotonic)


class TrunkGenerations:
    def __init__(self, trunk: TrunkPart, device: torch.device, wire_dtype: torch.dtype, max_sessions: int = 8,
                 max_tokens: int = 4096, idle_s: float = 120.0, compute_dtype: torch.dtype = torch.float32) -> None:
        self.trunk, self.device, self.wire_dtype = trunk, device, wire_dtype
        self.compute_dtype = compute_dtype  # the base's dtype (adapters are fp32 whatever it is)
        self.max_sessions, self.max_tokens, self.idle_s = max_sessions, max_tokens, idle_s
        self.active: OrderedDict[str, _Generation] = OrderedDict()

    def handle(self, msg: Message) -> Message | None:
        """The reply to a GENERATE (None for a GENERATE_END)."""
        self._expire()
        if msg.kind == Kind.GENERATE_END:
            self.active.pop(msg.silo_id, None)
            return None
        hidden, mask, positions = msg.tensors
        if hidden.shape[-1] != self.trunk.config.hidden_size:
            raise GenerationError("schema", f"hidden size {hidden.shape[-1]}, trunk expects {self.trunk.config.hidden_size}")
        gen = self._open(msg.silo_id) if msg.step == 0 else self.active.get(msg.silo_id)
        if gen is None or gen.next_step != msg.step:
            raise GenerationError("no_generation", f"{msg.silo_id} step {msg.step} continues no open generation")
        if gen.session.seen + mask.shape[1] > self.max_tokens:
            self.active.pop(msg.silo_id, None)
            raise GenerationError("too_long", f"more than {self.max_tokens} positions in one generation")
        h2 = gen.session(hidden.to(self.device, self.compute_dtype), mask.to(self.device), positions.to(self.device))
        gen.next_step += 1
        gen.last_used = time.monotonic()
        self.active.move_to_end(msg.silo_id)
        return Message(Kind.GENERATE_RESULT, msg.run_id, msg.silo_id, msg.round, msg.step,
                       tensors=[h2.to(self.wire_dtype)])

    def _open(self, silo: str) -> _Generation:
        self.active.pop(silo, None)
        while len(self.active) >= self.max_sessions:
            old, _ = self.active.popitem(last=False)
            log.warning("dropped the generation cache of %s: more than %d at once", old, self.max_sessions)
        self.active[silo] = gen = _Generation(PartSession(self.trunk))
        return gen

    def _expire(self) -> None:
        now = time.monotonic()
        for silo in [s for s, g in self.active.items() if now - g.last_used > self.idle_s]:
            log.info("freed the idle generation cache of %s", silo)
            del self.active[silo]
