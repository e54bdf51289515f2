"""Single-process reference of client-batch mode: every step, one trunk batch from all silos.

Built from the same parts and the same batching code as the split run (shared/model/batching.py): each
silo's head runs on its own batch, the outputs are padded and concatenated, the trunk runs once,
each silo's tail and loss run on its slice, and one trunk backward takes the slices' gradients.
The trunk's gradient is the mean over the silos, as on the trunk worker.

tests/test_client_batch_plain.py checks this against a plain unsplit model at batch M*b, written
without any of this code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.model.adapters import adapter_state_dict, apply_adapter, unique_parameters
from shared.model.batching import concat_padded, scatter_grads, take
from shared.model.loss import causal_lm_loss
from shared.model.part_loading import build_part, build_silo_parts
from shared.model.model_split import positions_from_mask
from shared.model.optim import make_optimizer
from shared.model.quantize import quantize_linears
from splitfed.reference.reference_run import (
    ReferenceRun,
    fedavg_,
    load_datasets,
    reference_settings,
    round_ends,
    silo_ids,
    step_optimizers,
)


def centralized_client_batch(model_dir: Path, run, data_paths: list[Path]) -> ReferenceRun:
    settings = reference_settings(model_dir, run)
    cfg = settings.adapter_config()
    datasets = load_datasets(model_dir, run, data_paths)
    parts = [build_silo_parts(model_dir, settings.head_layers, settings.tail_layers) for _ in datasets]
    silo_params = [unique_parameters(apply_adapter(h, cfg, settings.seed), apply_adapter(t, cfg, settings.seed))
                   for h, t in parts]
    silo_opts = [make_optimizer(ps, settings.lr, settings.weight_decay) for ps in silo_params]
    trunk = build_part(model_dir, "trunk", settings.head_layers, settings.tail_layers)
    quantize_linears(trunk, getattr(run, "trunk_quant", "none"), torch.float32, torch.device("cpu"))
    trunk_params = apply_adapter(trunk, cfg, settings.seed)
    trunk_opt = make_optimizer(trunk_params, settings.lr, settings.weight_decay)
    weights = [d.num_examples for d in datasets]

    history = []
    for step in range(run.steps):
        batches = [d.batch(step) for d in datasets]
        positions = [positions_from_mask(b.attention_mask) for b in batches]
        h1s = [head(b.input_ids, b.attention_mask, p) for (head, _), b, p in zip(parts, batches, positions)]
        hidden, mask, pos, slices = concat_padded([h.detach() for h in h1s], [b.attention_mask for b in batches],
                                                  positions)
        trunk_in = hidden.requires_grad_(True)
        trunk_out = trunk(trunk_in, mask, pos)
        grads, losses = [], []
        for (_, tail), b, p, s in zip(parts, batches, positions, slices):
            h2 = take(trunk_out.detach(), s).requires_grad_(True)
            loss = causal_lm_loss(tail(h2, b.attention_mask, p), b.labels)
            loss.backward()
            grads.append(h2.grad)
            losses.append(float(loss.detach()))
        trunk_out.backward(scatter_grads(grads, slices, trunk_out))
        for t in trunk_params:
            if t.grad is not None:
                t.grad.div_(len(datasets))
        step_optimizers([trunk_opt])
        for h1, s, opt in zip(h1s, slices, silo_opts):
            h1.backward(take(trunk_in.grad, s))
            step_optimizers([opt])
        history += [{"silo_index": i, "step": step, "loss": v} for i, v in enumerate(losses)]
        if getattr(run, "aggregation", "fedavg") == "fedavg" and len(datasets) > 1 and round_ends(step, run):
            fedavg_(silo_params, weights)
    final = {sid: {**adapter_state_dict(head), **adapter_state_dict(tail)}  # as the silo writes its file
             for sid, (head, tail) in zip(silo_ids(run, len(parts)), parts)}
    return ReferenceRun(history, {**final, "trunk": adapter_state_dict(trunk)})
