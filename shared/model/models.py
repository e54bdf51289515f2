"""Resolve a model setting ('tiny', 'smollm2' or a directory) to a local model directory.

'tiny' (and 'tiny-256') is a small config-built Llama (byte-level tokenizer, random weights) cached once, so
every role of a run loads the very same weights from disk, like they would a real checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from shared.model.tiny_models import make_tiny_model_dir
from shared.model.model_store import resolve_model
from shared.data.tokenizer import byte_tokenizer

# Bump the version when the preset changes, so old caches are not reused by mistake.
TINY_PRESETS = {
    "tiny": dict(family="llama", hidden_size=64, num_layers=4, vocab_size=260, seed=0),
    # `splitfed bench step`'s model: compute like a small real LM (32000-word head) at test cost.
    "tiny-256": dict(family="llama", hidden_size=256, num_layers=8, vocab_size=32000, seed=0),
}
TINY_VERSION = "v1"


def cache_root() -> Path:
    return Path(os.environ.get("SPLITFED_CACHE_DIR", Path.home() / ".cache" / "splitfed"))


def resolve_model_dir(spec: str) -> Path:
    if spec in TINY_PRESETS:
        return ensure_tiny(spec)
    return resolve_model(spec)


def ensure_tiny(name: str) -> Path:
    target = cache_root() / "models" / f"{name}-{TINY_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        make_tiny_model_dir(tmp, **TINY_PRESETS[name])
        byte_tokenizer().save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: concurrent builders race, one wins
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
