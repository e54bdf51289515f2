"""Micro-batches: weighted pieces whose gradients add up to the whole batch's; and the split
pipeline with overlapped micro-batches (real broker and trunk processes, bf16 and fp32 on the wire)
against the single-process reference with the same accumulation, through `splitfed bench step`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from shared.data.dataset import Batch
from shared.model.loss import IGNORE_INDEX, causal_lm_loss
from shared.model.microbatch import split_batch
from tests.conftest import REDIS_URL


def test_weighted_micro_batch_losses_add_up_to_the_batch_loss():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (5, 12), generator=g)
    labels[1, 6:] = IGNORE_INDEX  # rows with different numbers of labelled tokens
    labels[3, :9] = IGNORE_INDEX
    batch = Batch(input_ids=labels.clamp(min=0), attention_mask=torch.ones_like(labels), labels=labels)
    logits = torch.randn(5, 12, 50, generator=g)
    pieces = split_batch(batch, 3)
    assert [p.input_ids.shape[0] for p, _ in pieces] == [2, 2, 1]
    assert sum(w for _, w in pieces) == pytest.approx(1.0)
    rows = torch.tensor_split(torch.arange(5), 3)
    total = sum(causal_lm_loss(logits[r], p.labels) * w for (p, w), r in zip(pieces, rows))
    assert float(total) == pytest.approx(float(causal_lm_loss(logits, labels)), abs=1e-6)
    with pytest.raises(ValueError):
        split_batch(batch, 6)


@pytest.mark.slow
def test_overlapped_micro_batches_match_the_reference(tmp_path, redis_prefix):
    out = tmp_path / "bench.json"
    env = {**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "splitfed", "bench", "step", "--model", "tiny", "--batch-size", "4",
         "--max-length", "128", "--micro-batches", "2", "--warmup", "1", "--steps", "3",
         "--wire-dtypes", "fp32,bf16", "--key-prefix", redis_prefix, "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fp32, bf16 = json.loads(out.read_text())["runs"]
    assert fp32["loss_diff"]["steps"] == 4 and fp32["loss_diff"]["max"] <= 1e-5
    # bf16 on the wire (activations and both gradients) moves the loss a little, not a lot
    assert 0 < bf16["loss_diff"]["max"] < 0.05
    for run in (fp32, bf16):
        # Without the pools every step would allocate each large payload (>= 4 per step here). With
        # them a new buffer appears only while a pool grows to the most buffers ever alive at
        # once, which with stashed out-of-order replies depends on arrival order: at most one.
        assert max(run["buffer_allocations_per_step"].values()) <= 1
    assert fp32["bytes_vs_ideal"] <= 1.02
    assert bf16["bytes_per_step"] < 0.6 * fp32["bytes_per_step"]
