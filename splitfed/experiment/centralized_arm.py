"""The centralized arm: one model, one LoRA, trained on the union of the silos' data in one process.

Same adapter (and its seeded initialisation), optimizer, learning rate, batch size and max length
as the split-fed arm, and the same budget: silos x steps updates, i.e. the same number of
examples seen. The reference every split-federated claim is measured against.
"""

from __future__ import annotations

import time
from pathlib import Path

from shared.model.adapters import AdapterConfig
from shared.data.dataset import SiloDataset, load_jsonl
from shared.model.loss import causal_lm_loss
from shared.model.model_split import positions_from_mask
from shared.model.optim import make_optimizer
from splitfed.reference.reference import UnsplitModel
from shared.data.tokenizer import load_tokenizer
from splitfed.experiment.presets import Preset


def lora_config(preset: Preset) -> AdapterConfig:
    return AdapterConfig(kind="lora", lora_r=preset.lora_r, lora_alpha=preset.lora_alpha)


def train_centralized(model_dir: Path, preset: Preset, union_path: Path, progress=None) -> tuple[list[float], dict, float]:
    """Per-step losses, the trained adapter state (full parameter names) and the training seconds."""
    tokenizer = load_tokenizer(model_dir)
    data = SiloDataset(load_jsonl(union_path), tokenizer, preset.batch_size, preset.max_length, preset.seed, 0)
    model = UnsplitModel(model_dir, lora_config(preset), preset.seed)
    optimizer = make_optimizer(model.trainable, preset.lr, 0.0)
    losses = []
    started = time.perf_counter()
    total = preset.silos * preset.steps
    for step in range(total):
        batch = data.batch(step)
        logits = model(batch.input_ids, batch.attention_mask, positions_from_mask(batch.attention_mask))
        loss = causal_lm_loss(logits, batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, total, losses[-1])
    state = {n: p.detach().clone() for n, p in model.named_trainable().items()}
    return losses, state, time.perf_counter() - started
