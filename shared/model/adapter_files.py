"""Trained adapters on disk: safetensors only, written atomically, read back with clear errors.

A split run leaves its adapter in pieces: each silo's head/tail tensors (``silo_agent`` writes
``<silo>.safetensors``) and the trunk's (``trunk.safetensors``). Every tensor is named by its full
parameter name in the unsplit model, so the pieces merge into the whole model's adapter by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from shared.model.adapters import AdapterConfig
from shared.state.atomic_files import atomic_path


class AdapterFileError(ValueError):
    """An adapter file that is missing, unreadable, or does not fit the model or settings."""


def adapter_metadata(cfg: AdapterConfig, role: str) -> dict[str, str]:
    """What trained these tensors, stored in the file's header so a reader can check its settings."""
    return {"format": "splitfed-adapter", "role": role, "adapter": cfg.kind, "lora_r": str(cfg.lora_r),
            "lora_alpha": f"{float(cfg.lora_alpha):g}", "prefix_len": str(cfg.prefix_len)}


def save_adapter_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write under a temporary name, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_adapter_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of one adapter file (safetensors: no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({exc})") from None


def check_metadata(path: Path, metadata: dict[str, str], cfg: AdapterConfig) -> None:
    """Refuse a file trained with other adapter settings than the ones given (when it says which)."""
    if metadata.get("format") != "splitfed-adapter":
        return  # a silo's file carries no header: its shapes are checked on load instead
    expected = adapter_metadata(cfg, metadata.get("role", ""))
    keys = ["adapter"] + {"lora": ["lora_r", "lora_alpha"], "prefix": ["prefix_len"], "full": []}[cfg.kind]
    wrong = [f"{k}={metadata.get(k)} (given {expected[k]})" for k in keys if metadata.get(k) != expected[k]]
    if wrong:
        raise AdapterFileError(f"{path} was trained with {', '.join(wrong)}: pass the run's adapter settings")


def merge_split_adapters(*pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One adapter state dict from the split's pieces; a name held by two pieces is an error."""
    merged: dict[str, torch.Tensor] = {}
    for piece in pieces:
        both = sorted(merged.keys() & piece.keys())
        if both:
            raise AdapterFileError(f"the same tensors in two adapter files: {both[:3]}")
        merged.update(piece)
    return merged


def load_split_adapters(silo_file: Path, trunk_file: Path, cfg: AdapterConfig) -> dict[str, torch.Tensor]:
    """A silo's head/tail file and the trunk's file merged into the whole model's adapter."""
    pieces = []
    for path in (silo_file, trunk_file):
        tensors, metadata = load_adapter_file(path)
        check_metadata(path, metadata, cfg)
        pieces.append(tensors)
    return merge_split_adapters(*pieces)
