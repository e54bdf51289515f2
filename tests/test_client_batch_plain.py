"""Client-batch's reference (splitfed/reference/centralized_batch.py) against a PLAIN unsplit Hugging Face model
trained at batch M*b, written here without any of the code the system and that reference share
(no parts, no shared/model/batching.py, no shared/model/loss.py, no make_optimizer, no secure_agg averaging).

What "equals centralized training at batch M*b" (DESIGN.md, client-batch) means exactly:

* the trunk sees one batch of M*b rows (every silo's b rows, right-padded to the longest) and takes
  one AdamW step on the gradient of mean_i L_i, L_i being silo i's own token-mean loss. That is the
  mean of per-silo means, not the token mean over the M*b batch: the two differ whenever silos
  have different numbers of label tokens;
* each silo's head and tail are its own (its own AdamW moments too) and step on dL_i alone. At a
  round's end they become their sample-weighted FedAvg. So one plain model with ONE AdamW on the
  M*b loss is what client-batch computes only for the trunk: head/tail would differ even with a
  FedAvg after every step (the average of M AdamW steps is not the AdamW step of the averaged
  gradient), and within a round of K > 1 steps the silos' head/tails part ways.

The plain reference below is that, faithfully: ONE plain model, whose trunk is the trunk; silo i's
rows of the M*b batch go through that model with silo i's head/tail tensors swapped in
(``functional_call``), and only those rows enter L_i; other silos' rows cost compute, not
correctness (rows never attend to each other). With K = 1 every silo holds the same head/tail at
every step, so each step is literally one plain model's forward at batch M*b.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import AutoModelForCausalLM

from shared.model.adapters import apply_adapter
from splitfed.reference.centralized_batch import centralized_client_batch
from shared.data.dataset import SiloDataset, load_jsonl
from shared.model.tiny_models import make_tiny_model_dir
from shared.runtime.settings import ModelSettings
from shared.data.tokenizer import byte_tokenizer, load_tokenizer

TOL = 1e-5
SIZES = (6, 8, 10)  # examples per silo: unequal FedAvg weights
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=0)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_paths(tmp_path_factory):
    """Silo i's examples grow with i, so its batches have other lengths (and label counts) than its peers'."""
    root = tmp_path_factory.mktemp("data")
    paths = []
    for i, n in enumerate(SIZES):
        lines = [{"prompt": f"Q{k}:" + " x" * (k % 3), "completion": " " + " ".join(WORDS[: 1 + (k + 2 * i) % 6])}
                 for k in range(n)]
        path = root / f"silo{i}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in lines))
        paths.append(path)
    return paths


def _run(adapter: str, local_steps: int) -> SimpleNamespace:
    # lr 1e-3 (the demo's): at 1e-2 AdamW magnifies float32 rounding in near-zero LoRA-A gradients
    # (m / sqrt(v) of noise) to 1e-5 after a few steps, in either implementation
    return SimpleNamespace(mode="client-batch", seed=7, adapter=adapter, lr=1e-3, head_layers=1, tail_layers=1,
                           batch_size=2, max_length=48, steps=5, local_steps=local_steps, aggregation="fedavg")


# ------------------------------------------------------------------------------ the plain reference


def _pad_concat(batches):
    """The M silos' [b, t_i] batches as one [M*b, max t] batch, right-padded (mask 0, label -100)."""
    width = max(b.input_ids.shape[1] for b in batches)
    ids, mask, labels, rows, start = [], [], [], [], 0
    for b in batches:
        n, t = b.input_ids.shape
        ids.append(torch.cat([b.input_ids, torch.zeros(n, width - t, dtype=torch.long)], 1))
        mask.append(torch.cat([b.attention_mask, torch.zeros(n, width - t, dtype=torch.long)], 1))
        labels.append(torch.cat([b.labels, torch.full((n, width - t), -100)], 1))
        rows.append(slice(start, start + n))
        start += n
    return torch.cat(ids), torch.cat(mask), torch.cat(labels), rows


def _token_mean_ce(logits, labels):
    """Next-token cross-entropy, averaged over the tokens that have a label."""
    pred, target = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = target != -100
    return F.cross_entropy(pred[keep], target[keep], reduction="sum") / keep.sum()


def plain_client_batch(model_dir, run, datasets):
    """Per-(silo, step) losses and final weights, by the same file stems and names as the system's."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # eval: dropout off
    cfg = ModelSettings(model=str(model_dir), adapter=run.adapter).adapter_config()
    apply_adapter(model, cfg, run.seed)  # the same initial adapter: drawn from (seed, name) alone
    n_layers = model.config.num_hidden_layers

    def in_trunk(name):
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return m is not None and run.head_layers <= int(m.group(1)) < n_layers - run.tail_layers

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}  # a tied weight once
    trunk = {n: p for n, p in trainable.items() if in_trunk(n)}
    silos = [{n: torch.nn.Parameter(p.detach().clone()) for n, p in trainable.items() if not in_trunk(n)}
             for _ in datasets]
    trunk_opt = torch.optim.AdamW(trunk.values(), lr=run.lr, weight_decay=ModelSettings().weight_decay)
    silo_opts = [torch.optim.AdamW(s.values(), lr=run.lr, weight_decay=ModelSettings().weight_decay) for s in silos]
    counts = torch.tensor([d.num_examples for d in datasets], dtype=torch.float64)

    losses = {}
    for step in range(run.steps):
        ids, mask, labels, rows = _pad_concat([d.batch(step) for d in datasets])
        trunk_grad = {n: torch.zeros_like(p) for n, p in trunk.items()}
        for i, own in enumerate(silos):
            logits = functional_call(model, own, (), {"input_ids": ids, "attention_mask": mask}).logits
            loss = _token_mean_ce(logits[rows[i]], labels[rows[i]])
            grads = torch.autograd.grad(loss, [*own.values(), *trunk.values()], allow_unused=True)
            for p, g in zip(own.values(), grads):
                p.grad = g  # None (unused): AdamW skips it, as it does on the silo
            for (n, acc), g in zip(trunk_grad.items(), grads[len(own):]):
                if g is not None:
                    acc += g / len(datasets)  # the trunk's loss: the mean of the silos' losses
            losses[(i, step)] = float(loss.detach())
        for n, p in trunk.items():
            p.grad = trunk_grad[n]
        for opt in (trunk_opt, *silo_opts):
            opt.step()
            opt.zero_grad(set_to_none=True)
        if (step + 1) % run.local_steps == 0 or step + 1 == run.steps:  # a round's end: FedAvg
            with torch.no_grad():
                for n in silos[0]:
                    avg = sum(w * s[n].double() for w, s in zip(counts, silos)) / counts.sum()
                    for s in silos:
                        s[n].copy_(avg)

    # Name the tensors as the files do: under every name, a tied weight as embedding and LM head.
    canonical = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), n)
    names = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    weights = {f"silo{i}": {n: own[c].detach() for n, c in names.items() if not in_trunk(n)}
               for i, own in enumerate(silos)}
    weights["trunk"] = {n: trunk[c].detach() for n, c in names.items() if in_trunk(n)}
    return losses, weights


# ------------------------------------------------------------------------------------------ tests


def _weight_diffs(got, want) -> dict[str, float]:
    """Per file stem, max |got - want| over its tensors; names and shapes must agree exactly."""
    assert got.keys() == want.keys()
    out = {}
    for stem in want:
        assert got[stem].keys() == want[stem].keys(), stem
        assert all(got[stem][n].shape == t.shape for n, t in want[stem].items()), stem
        out[stem] = max(float((got[stem][n].double() - t.double()).abs().max()) for n, t in want[stem].items())
    return out


@pytest.mark.parametrize("local_steps", [1, 2])  # K=1: one plain model at every step; K=2: silos part ways
@pytest.mark.parametrize("adapter", ["lora", "full"])  # full: the tied embedding, every head/tail weight
def test_client_batch_reference_equals_a_plain_model_at_batch_m_times_b(model_dir, data_paths, adapter, local_steps):
    run = _run(adapter, local_steps)
    tokenizer = load_tokenizer(model_dir)
    datasets = [SiloDataset(load_jsonl(p), tokenizer, run.batch_size, run.max_length, run.seed, i)
                for i, p in enumerate(data_paths)]
    widths = {d.batch(s).input_ids.shape[1] for d in datasets for s in range(run.steps)}
    assert len(widths) > 1, "the silos' batches must differ in length, or padding is not tested"

    want_losses, want_weights = plain_client_batch(model_dir, run, datasets)
    ref = centralized_client_batch(model_dir, run, data_paths)

    got_losses = {(r["silo_index"], r["step"]): r["loss"] for r in ref.history}
    assert len(ref.history) == len(got_losses) == len(want_losses) == len(SIZES) * run.steps
    assert got_losses.keys() == want_losses.keys()
    assert max(abs(got_losses[k] - want_losses[k]) for k in want_losses) <= TOL
    # the weights after the last step's update and the last FedAvg (which no loss has seen)
    assert max(_weight_diffs(ref.weights, want_weights).values()) <= TOL
    # and every part moved: a part that does not train would not pass by accident
    initial = plain_client_batch(model_dir, SimpleNamespace(**{**vars(run), "steps": 0}), datasets)[1]
    assert min(_weight_diffs(initial, want_weights).values()) > 100 * TOL
