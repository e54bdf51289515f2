"""A silo's rounds on disk: the round barrier, its checkpoints, resuming after a rollback, results."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from shared.crypto.sealed_codec import SealedCodec
from shared.model.adapters import adapter_state_dict
from shared.state import checkpoint
from shared.state.atomic_files import atomic_path
from shared.wire.protocol import Kind
from shared.wire.wire import Message
from silo_agent.peer_errors import PeerError

log = logging.getLogger("silo")


class SiloRounds:
    """Part of SiloAgent (silo_agent/agent.py): what a round leaves behind, and going back to it."""

    @property
    def _checkpoints(self) -> Path:
        return self.settings.checkpoint_dir / self.settings.silo_id

    def _end_round(self, rnd: int) -> None:
        """The round barrier (and FedAvg), then this silo's checkpoint of the round."""
        self.aggregation.run(rnd)
        if self.settings.checkpoint_dir is not None:
            self._save_checkpoint(rnd)
        self.send(Message(Kind.CHECKPOINTED, self.settings.run_id, self.settings.silo_id, rnd))

    def _save_checkpoint(self, rnd: int) -> None:
        tensors = {f"param/{i}": p for i, p in enumerate(self.trainable)}
        tensors.update(checkpoint.optimizer_tensors(self.optimizer))
        if self.privacy is not None:  # the silo's own adapter and inverter: restored with the head
            tensors.update(self.privacy.state_tensors())
        checkpoint.save(self._checkpoints, rnd, tensors, {"round": rnd, "history": self.history})

    def _resume(self, rnd: int) -> int:
        """Load the checkpoint of round ``rnd`` (-1: the initial state); return the next step."""
        s = self.settings
        first = (rnd + 1) * s.local_steps
        if rnd == -1 and not self.history:
            return 0  # nothing trained yet: the fresh state is the initial state
        if s.checkpoint_dir is None:
            raise PeerError(f"the run rolls back to round {rnd}, but this silo keeps no checkpoints "
                            "(start it with --checkpoint-dir)")
        loaded = checkpoint.load(self._checkpoints, rnd)
        if loaded is None:
            # Rounds went on without this silo (it was away): rejoin at the next round with the
            # newest weights it has; the next aggregation brings it up to date.
            older = [r for r in checkpoint.rounds_on_disk(self._checkpoints) if r < rnd]
            if not older:
                raise PeerError(f"no checkpoint of round {rnd} (or older) in {self._checkpoints}")
            log.warning("no checkpoint of round %d: rejoining with this silo's round %d weights", rnd, older[-1])
            loaded = checkpoint.load(self._checkpoints, older[-1])
        tensors, meta = loaded
        with torch.no_grad():
            for i, p in enumerate(self.trainable):
                p.copy_(tensors[f"param/{i}"])
        checkpoint.load_optimizer_tensors(self.optimizer, tensors)
        if self.privacy is not None:
            self.privacy.load_state_tensors(tensors)
        self._zero_grad()
        self.history = meta.get("history", [])
        log.info("resumed from the checkpoint of round %d: next step %d", rnd, first)
        return first

    def _write_results(self, wall_s: float) -> None:
        s = self.settings
        if s.save_dir is not None:
            s.save_dir.mkdir(parents=True, exist_ok=True)
            tensors = {**adapter_state_dict(self.head), **adapter_state_dict(self.tail)}
            tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
            _atomic(s.save_dir / f"{s.silo_id}.safetensors", lambda p: save_file(tensors, str(p)))
            if self.privacy is not None:  # never among the federated parts: save_dir/privacy/
                self.privacy.save(s.save_dir, s.silo_id)
        if s.results is not None:
            crypto_s = self.codec.crypto_seconds() if isinstance(self.codec, SealedCodec) else 0.0
            doc = {"silo_id": s.silo_id, "silo_index": s.silo_index, "steps": self.history, "wall_s": wall_s,
                   "encryption": isinstance(self.codec, SealedCodec), "crypto_s": crypto_s,
                   "timeline": list(self.timeline.rows)}
            if self.privacy is not None:
                doc["privacy"] = self.privacy.summary()
            _atomic(s.results, lambda p: p.write_text(json.dumps(doc, indent=1)))


def _atomic(path: Path, write) -> None:
    """Write to a temporary name, fsync and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write(tmp)
