"""What every single-process reference shares: its result, its settings and data, round ends, FedAvg."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.data.dataset import SiloDataset, load_jsonl
from shared.crypto.secure_agg import flatten, plain_fedavg, unflatten_into
from shared.runtime.settings import ModelSettings
from shared.data.tokenizer import load_tokenizer


@dataclass
class ReferenceRun:
    """A reference training's result. ``history``: one {"silo_index", "step", "loss"} per silo step.
    ``weights``: the trainable tensors after the last optimizer step and the last round's averaging,
    by file stem of a run's weights directory: ``<silo>`` (its head and tail), ``trunk`` (the shared
    trunk adapter; in hierarchical mode the last average) and, hierarchical, ``trunk-<silo>``."""

    history: list[dict]
    weights: dict[str, dict[str, torch.Tensor]]


def silo_ids(run, n: int) -> list[str]:
    """The run's silo ids (a DemoConfig has them), else the demo's own naming."""
    return list(getattr(run, "silo_ids", None) or [f"silo{i}" for i in range(n)])


def reference_settings(model_dir: Path, run) -> ModelSettings:
    return ModelSettings(model=str(model_dir), seed=run.seed, adapter=run.adapter, lr=run.lr,
                         head_layers=run.head_layers, tail_layers=run.tail_layers)


def load_datasets(model_dir: Path, run, data_paths: list[Path]) -> list[SiloDataset]:
    tokenizer = load_tokenizer(model_dir)
    return [SiloDataset(load_jsonl(p), tokenizer, run.batch_size, run.max_length, run.seed, i)
            for i, p in enumerate(data_paths)]


def round_ends(step: int, run) -> bool:
    return (step + 1) % run.local_steps == 0 or step + 1 == run.steps


def fedavg_(param_lists: Sequence[Sequence[torch.nn.Parameter]], weights: Sequence[int]) -> None:
    """Replace every list's parameters by the weighted average over the lists (in place)."""
    average = plain_fedavg([flatten(ps) for ps in param_lists], weights)
    for ps in param_lists:
        unflatten_into(ps, average)


def step_optimizers(opts) -> None:
    """One optimizer step each (None: a part without trainables), gradients dropped."""
    for o in opts:
        if o is not None:
            o.step()
            o.zero_grad(set_to_none=True)
