"""Single-process references: the same computation as a split run of each mode, without network.

* serial -- each silo gets its own copy of the UNSPLIT model (its own embeddings, head and tail,
  with the adapter initialisation the silo uses); the copies share one set of trunk layers, as
  the silos share one trunk worker. Steps run step-major, silo-minor, as the serial schedule.
* hierarchical -- each silo's unsplit model also has its own trunk adapter (over the same frozen
  base weights); silos train independently within a round.
* client-batch -- splitfed/reference/centralized_batch.py (the trunk batch is the silos' concatenation).

With aggregation on, at every round's end the silos' head/tail trainables are replaced by their
FedAvg (weighted by sample counts): what secure aggregation computes, here in plain float64. In
hierarchical mode the trunk adapters are averaged at every round's end unless ``personalize``,
whatever ``aggregation`` says (it is about head/tail only), as the trunk workers do.

Each reference returns its losses and its final weights, keyed like the files a run writes to its
weights directory, so `splitfed demo --check-centralized` compares both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from splitfed.reference.centralized_batch import centralized_client_batch
from shared.model.loss import causal_lm_loss
from shared.model.model_split import positions_from_mask
from shared.model.optim import make_optimizer
from splitfed.reference.reference import UnsplitModel
from splitfed.reference.reference_run import (
    ReferenceRun,
    fedavg_,
    load_datasets,
    reference_settings,
    round_ends,
    silo_ids,
    step_optimizers,
)
from shared.runtime.settings import ModelSettings


def build_silo_models(model_dir: Path, settings: ModelSettings, n_silos: int, share_trunk: bool = True,
                      trunk_quant: str = "none") -> list[UnsplitModel]:
    cfg = settings.adapter_config()
    models = [UnsplitModel(model_dir, cfg, settings.seed, settings.head_layers, settings.tail_layers,
                           trunk_quant=trunk_quant) for _ in range(n_silos)]
    if share_trunk:
        shared_layers = models[0].model.get_submodule(models[0].facts.layers)
        for m in models[1:]:
            layers = m.model.get_submodule(m.facts.layers)
            for j in m.plan.trunk_range:
                layers[j] = shared_layers[j]  # one trunk (and its adapter) for every silo
    return models


def centralized_run(model_dir: Path, run, data_paths: list[Path]) -> ReferenceRun:
    """Train like a run of ``run.mode`` configured by ``run`` (a DemoConfig-like object)."""
    hf_logging.disable_progress_bar()  # the demo prints its own progress
    mode = getattr(run, "mode", "serial")
    if mode == "client-batch":
        return centralized_client_batch(model_dir, run, data_paths)
    settings = reference_settings(model_dir, run)
    datasets = load_datasets(model_dir, run, data_paths)
    hierarchical = mode == "hierarchical"
    average_silos = getattr(run, "aggregation", "fedavg") == "fedavg" and len(data_paths) > 1
    average_trunk = hierarchical and not getattr(run, "personalize", False)
    models = build_silo_models(model_dir, settings, len(data_paths), share_trunk=not hierarchical,
                               trunk_quant=getattr(run, "trunk_quant", "none"))
    groups = [m.trainable_groups() for m in models]
    silo_params = [list(dict.fromkeys(g["head"] + g["tail"])) for g in groups]  # tied weights once
    silo_opts = [make_optimizer(ps, settings.lr, settings.weight_decay) for ps in silo_params]
    trunk_opts = ([make_optimizer(g["trunk"], settings.lr, settings.weight_decay) for g in groups] if hierarchical
                  else [make_optimizer(groups[0]["trunk"], settings.lr, settings.weight_decay)] * len(models))
    weights = [d.num_examples for d in datasets]

    history = []
    for step in range(run.steps):
        for i, (model, data) in enumerate(zip(models, datasets)):
            batch = data.batch(step)
            logits = model(batch.input_ids, batch.attention_mask, positions_from_mask(batch.attention_mask))
            loss = causal_lm_loss(logits, batch.labels)
            loss.backward()
            step_optimizers([trunk_opts[i], silo_opts[i]])
            history.append({"silo_index": i, "step": step, "loss": float(loss.detach())})
        if (average_silos or average_trunk) and round_ends(step, run):
            if average_silos:
                fedavg_(silo_params, weights)
            if average_trunk:  # one silo: its own average, but the trunk still writes it as the average
                fedavg_([g["trunk"] for g in groups], weights)
    return ReferenceRun(history, _final_weights(models, silo_ids(run, len(models)), hierarchical, average_trunk))


def _final_weights(models: list[UnsplitModel], ids: list[str], hierarchical: bool, averaged: bool
                   ) -> dict[str, dict[str, torch.Tensor]]:
    states = [m.part_states() for m in models]
    weights = {sid: {**s["head"], **s["tail"]} for sid, s in zip(ids, states)}
    if not hierarchical:
        weights["trunk"] = states[0]["trunk"]  # one trunk shared by every silo
        return weights
    weights.update({f"trunk-{sid}": s["trunk"] for sid, s in zip(ids, states)})
    if averaged:  # the last step ends a round: every silo holds that round's average
        weights["trunk"] = states[0]["trunk"]
    return weights


def centralized_reference(model_dir: Path, run, data_paths: list[Path]) -> list[dict]:
    """The losses only (callers that predate the weights check)."""
    return centralized_run(model_dir, run, data_paths).history
