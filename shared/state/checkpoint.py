"""Round checkpoints: a role's trainable tensors and optimizer state at the end of a round.

One safetensors file per (role instance, round): ``{dir}/round-{R}.safetensors`` (R = -1 is the
state before the first step). Written to a temporary name, fsynced and renamed, so a crash never
leaves half a checkpoint; the two newest are kept (the run's committed round in Redis may lag the
newest file by one). Plain tensors and string metadata only: loading runs no code.

AdamW state is flattened to tensors named ``opt/{i}/exp_avg`` etc., i = the parameter's index in
the optimizer's one param group, so a fresh optimizer over the same parameters takes it back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.state.atomic_files import atomic_path

KEEP = 2
_NAME = re.compile(r"^round-(-?\d+)\.safetensors$")


def path_for(directory: Path, rnd: int) -> Path:
    return Path(directory) / f"round-{rnd}.safetensors"


def optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    if optimizer is None:
        return {}
    out = {}
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        for key, value in optimizer.state.get(p, {}).items():
            # no copy: save() writes straight from the tensors, and a copy of every silo's moments
            # would double a hierarchical worker's optimizer memory at each round end
            out[f"opt/{i}/{key}"] = torch.as_tensor(value).detach().cpu()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer | None, tensors: dict[str, torch.Tensor]) -> None:
    if optimizer is None:
        return
    params = optimizer.param_groups[0]["params"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith("opt/"):
            continue
        _, index, key = name.split("/", 2)
        state.setdefault(int(index), {})[key] = value
    if any(i >= len(params) for i in state):
        raise ValueError(f"checkpoint has optimizer state for {max(state) + 1} parameters, the optimizer {len(params)}")
    for i, p in enumerate(params):
        entries = state.get(i)
        if entries is None:
            optimizer.state.pop(p, None)
            continue
        current = optimizer.state.get(p, {})
        restored = {}
        for k, v in entries.items():
            kept = current.get(k)
            if k != "step" and isinstance(kept, torch.Tensor) and kept.shape == v.shape:
                restored[k] = kept.copy_(v)  # in place: the state may be a view of a larger buffer
            else:
                restored[k] = v if k == "step" else v.to(p.device, p.dtype)
        optimizer.state[p] = restored


def save(directory: Path, rnd: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomically write round ``rnd``'s checkpoint; drop files older than the KEEP newest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = path_for(directory, rnd)
    with atomic_path(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"meta": json.dumps(meta)})
    for old in rounds_on_disk(directory)[:-KEEP]:
        path_for(directory, old).unlink(missing_ok=True)
    return target


def rounds_on_disk(directory: Path) -> list[int]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _NAME.match(p.name)))


def load(directory: Path, rnd: int) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Round ``rnd``'s checkpoint, or None when there is none."""
    path = path_for(directory, rnd)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    return tensors, meta
