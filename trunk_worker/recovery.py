"""The trunk worker's rounds on disk: checkpoints, going back to one when a role restarted, adapters."""

from __future__ import annotations

import logging
from pathlib import Path

from shared.model.adapter_files import adapter_metadata

log = logging.getLogger("trunk")


class TrunkRecovery:
    """Part of TrunkWorker (trunk_worker/worker.py): what its step runner saves and restores."""

    @property
    def _checkpoints(self) -> Path:
        return self.settings.checkpoint_dir / self.settings.worker_id

    def _save_checkpoint(self, rnd: int) -> None:
        self.steps.save_checkpoint(self._checkpoints, rnd)

    def restore(self, rnd: int) -> None:
        """Go back to the end of round ``rnd`` (-1: the initial state): a role restarted."""
        self.steps.clear()
        if rnd == -1 and self.updates == 0:
            return  # nothing applied yet: this is the initial state
        if self.settings.checkpoint_dir is None:
            log.error("asked to resume from round %d but this worker keeps no checkpoints (--checkpoint-dir)", rnd)
            return
        try:
            updates = self.steps.load_checkpoint(self._checkpoints, rnd)
        except ValueError as exc:  # a checkpoint of another layout: say so, keep serving
            log.error("cannot resume from round %d: %s", rnd, exc)
            return
        if updates is None:
            log.error("no checkpoint of round %d in %s: cannot resume exactly", rnd, self._checkpoints)
            return
        self.steps.updates = updates
        log.info("resumed from the checkpoint of round %d (%d updates)", rnd, updates)

    def _save_adapters(self, directory: Path) -> None:
        """The trunk's adapter(s) for `splitfed eval` / `splitfed export` (the runner knows which)."""
        self.steps.save_adapters(directory, adapter_metadata(self.settings.adapter_config(), "trunk"))
