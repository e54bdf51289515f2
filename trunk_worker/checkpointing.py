"""The trunk worker's round checkpoints: its adapter(s), optimizer state(s) and update counter.

Serial and client-batch: the one shared trunk adapter. Hierarchical: every silo's adapter and
optimizer on this worker, and the template new silos start from (the last round's average), each
as its one flat buffer: a round end with many silos writes a few tensors per silo, not hundreds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.state import checkpoint


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def _strip(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def save_trunk(directory: Path, rnd: int, trainable, optimizer, adapters, updates: int) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"round": rnd, "updates": updates}
    if adapters is None:
        tensors.update({f"param/{i}": p for i, p in enumerate(trainable)})
        tensors.update(checkpoint.optimizer_tensors(optimizer))
    else:
        tensors["template"] = adapters.template_flat
        meta["silos"], meta["averaged"] = sorted(adapters.params), adapters.averaged
        for silo in meta["silos"]:
            tensors.update(_prefixed(f"silo/{silo}/", adapters.state_of(silo)))
    checkpoint.save(directory, rnd, tensors, meta)


def load_trunk(directory: Path, rnd: int, trainable, optimizer, adapters) -> int | None:
    """Restore round ``rnd``; returns the update counter, or None when there is no such checkpoint."""
    loaded = checkpoint.load(directory, rnd)
    if loaded is None:
        return None
    tensors, meta = loaded
    with torch.no_grad():
        if adapters is None:
            for i, p in enumerate(trainable):
                p.copy_(tensors[f"param/{i}"])
            checkpoint.load_optimizer_tensors(optimizer, tensors)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
        else:
            if "template" not in tensors:
                raise ValueError(f"{checkpoint.path_for(directory, rnd)} holds no hierarchical trunk state "
                                 "(written in another mode, or by a splitfed before the flat per-silo layout)")
            adapters.template_flat.copy_(tensors["template"])
            adapters.averaged = bool(meta.get("averaged", False))
            adapters.forget_all()
            for silo in meta.get("silos", []):
                state = _strip(f"silo/{silo}/", tensors)
                if state.keys() != {"buffer", "steps"}:
                    raise ValueError(f"{checkpoint.path_for(directory, rnd)} lists {silo} but holds {sorted(state)} for it")
                adapters.load_state(silo, state["buffer"], state["steps"])
    return int(meta.get("updates", 0))
