"""Centralized reference training: the same computation as a serial split run, in one process.

Each silo gets its own copy of the UNSPLIT model (its own embeddings, head and tail, with the same
adapter initialisation the silo uses); the copies share one set of trunk layers, exactly as the
silos share one trunk worker. Steps run in the serial schedule's order (step-major, silo-minor),
with the same data batches and the same AdamW. No parts, no network: the model's own forward.
"""

from __future__ import annotations

from pathlib import Path

from transformers.utils import logging as hf_logging

from shared.data import SiloDataset, load_jsonl
from shared.loss import causal_lm_loss
from shared.model_split import positions_from_mask
from shared.optim import make_optimizer
from shared.reference import UnsplitModel
from shared.settings import ModelSettings
from shared.tokenizer import load_tokenizer


def build_silo_models(model_dir: Path, settings: ModelSettings, n_silos: int) -> list[UnsplitModel]:
    cfg = settings.adapter_config()
    models = [UnsplitModel(model_dir, cfg, settings.seed, settings.head_layers, settings.tail_layers)
              for _ in range(n_silos)]
    shared_layers = models[0].model.get_submodule(models[0].facts.layers)
    for m in models[1:]:
        layers = m.model.get_submodule(m.facts.layers)
        for j in m.plan.trunk_range:
            layers[j] = shared_layers[j]  # one trunk (and its adapter) for every silo
    return models


def centralized_serial(model_dir: Path, run, data_paths: list[Path]) -> list[dict]:
    """Train like a serial run configured by ``run`` (a DemoConfig-like object); return per-step losses."""
    settings = ModelSettings(model=str(model_dir), seed=run.seed, adapter=run.adapter, lr=run.lr,
                             head_layers=run.head_layers, tail_layers=run.tail_layers)
    hf_logging.disable_progress_bar()  # the demo prints its own progress
    tokenizer = load_tokenizer(model_dir)
    datasets = [SiloDataset(load_jsonl(p), tokenizer, run.batch_size, run.max_length, settings.seed, i)
                for i, p in enumerate(data_paths)]
    models = build_silo_models(model_dir, settings, len(data_paths))
    groups = [m.trainable_groups() for m in models]
    silo_opts = [make_optimizer(g["head"] + g["tail"], settings.lr, settings.weight_decay) for g in groups]
    trunk_opt = make_optimizer(groups[0]["trunk"], settings.lr, settings.weight_decay)

    history = []
    for step in range(run.steps):
        for i, (model, data, opt) in enumerate(zip(models, datasets, silo_opts)):
            batch = data.batch(step)
            positions = positions_from_mask(batch.attention_mask)
            logits = model(batch.input_ids, batch.attention_mask, positions)
            loss = causal_lm_loss(logits, batch.labels)
            loss.backward()
            for o in (trunk_opt, opt):
                if o is not None:
                    o.step()
                    o.zero_grad(set_to_none=True)
            history.append({"silo_index": i, "step": step, "loss": float(loss.detach())})
    return history
