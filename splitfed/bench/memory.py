"""`splitfed bench memory`: peak resident memory of a silo and of a trunk worker, per model and dtype.

Each (model, dtype, role) is measured in a fresh child process (`python -m splitfed.bench.memory_probe`),
so a peak is that role's alone: the child builds its part the way the role does (build_silo_parts /
build_part, LoRA through apply_adapter, AdamW over the adapter) and runs one training step on a
[batch, seq] batch, the silo with its loss, the trunk with a random cut gradient. Reported: the
resident set after imports (torch alone), after loading, and the peak over the step (with its
anonymous part apart: an fp32 checkpoint is memory-mapped, so an unconverted part's weights are
page-cache pages, shared and droppable, not the process's own), beside the
part's parameter count and bytes, and what the silo part holds by name (embedding, its blocks,
final norm, LM head), so "the silo holds only embeddings + its blocks + head" is checked, not assumed.

Models: any model setting ('smollm2', 'tiny', a directory), and 'llama-1b', a random Llama with
the shape of Llama 3.2 1B (hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocab 128256, tied),
written once to the cache in bf16 (2.5 GB; the fp32 rows upcast it while loading, tensor by tensor).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import click

LLAMA_1B = "llama-1b"
LLAMA_1B_SHAPE = dict(hidden_size=2048, num_layers=16, vocab_size=128256, intermediate_size=8192,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=2048)
LLAMA_1B_VERSION = "v1"


def llama_1b_dir() -> Path:
    """The random 1B-shaped Llama, written once (atomically) to the cache."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from shared.model.tiny_models import _tiny_config
    from shared.model.models import cache_root

    target = cache_root() / "models" / f"{LLAMA_1B}-random-{LLAMA_1B_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    shape = dict(LLAMA_1B_SHAPE)
    config = _tiny_config("llama", shape.pop("hidden_size"), shape.pop("num_layers"), shape.pop("vocab_size"),
                          initializer_range=0.02, **shape)
    click.echo(f"bench memory: writing a random 1B-shaped Llama to {target} (once, bf16)", err=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(tmp)
    os.rename(tmp, target)
    return target


def _model_dir(spec: str) -> Path:
    if spec == LLAMA_1B:
        return llama_1b_dir()
    from shared.model.models import resolve_model_dir

    return resolve_model_dir(spec)


def probe(model_dir: Path, role: str, dtype: str, head_layers: int, tail_layers: int, batch: int, seq: int,
          trunk_quant: str = "none") -> dict:
    """One role's memory, measured in a child process of its own."""
    cmd = [sys.executable, "-m", "splitfed.bench.memory_probe", "--model-dir", str(model_dir), "--role", role,
           "--dtype", dtype, "--head-layers", str(head_layers), "--tail-layers", str(tail_layers),
           "--batch", str(batch), "--seq", str(seq), "--trunk-quant", trunk_quant]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"memory probe {role}/{dtype} on {model_dir} failed:\n{done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["wall_s"] = round(time.perf_counter() - started, 1)
    return row


def measure(models: list[str], dtypes: list[str], head_layers: int, tail_layers: int, batch: int, seq: int,
            trunk_quants: tuple[str, ...] = ("none",)) -> dict:
    rows = []
    for spec in models:
        model_dir = _model_dir(spec)
        for dtype in dtypes:
            for role, quant in [("silo", "none"), *(("trunk", q) for q in trunk_quants)]:
                row = probe(model_dir, role, dtype, head_layers, tail_layers, batch, seq, quant)
                rows.append({"model": spec, **row})
                what = f"trunk ({quant})" if role == "trunk" and quant != "none" else role
                click.echo(f"bench memory: {spec} {dtype} {what}: peak {row['peak_rss_mb']:.0f} MB "
                           f"({row['params']:,} parameters, {row['param_mb']:.0f} MB; own memory after loading "
                           f"{row['loaded_anon_mb'] - row['baseline_anon_mb']:.0f} MB)", err=True)
    for row in rows:  # against fp32 (unquantized) of the same model and role, when both were measured
        fp32 = next((r for r in rows if r["model"] == row["model"] and r["role"] == row["role"]
                     and r["dtype"] == "fp32" and r["trunk_quant"] in (None, "none")), None)
        if fp32 is not None and row is not fp32:
            row["peak_vs_fp32"] = round(row["peak_rss_mb"] / fp32["peak_rss_mb"], 3)
            row["model_share_vs_fp32"] = round((row["peak_rss_mb"] - row["baseline_rss_mb"])
                                               / (fp32["peak_rss_mb"] - fp32["baseline_rss_mb"]), 3)
    return {"bench": "memory", "host": platform.node(), "cpus": os.cpu_count(),
            "batch": batch, "seq": seq, "head_layers": head_layers, "tail_layers": tail_layers,
            "adapter": "lora (r 8, family targets), AdamW", "rows": rows}


@click.command("memory")
@click.option("--models", default=f"smollm2,{LLAMA_1B}", show_default=True,
              help=f"comma-separated model settings ('{LLAMA_1B}' = random Llama 3.2 1B shape)")
@click.option("--dtypes", default="fp32,bf16", show_default=True)
@click.option("--head-layers", type=click.IntRange(1), default=2, show_default=True)
@click.option("--tail-layers", type=click.IntRange(1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option("--max-length", type=click.IntRange(8), default=128, show_default=True)
@click.option("--trunk-quants", default="none", show_default=True,
              help="comma-separated trunk bases to measure: none, nf4, int8 (bitsandbytes)")
@click.option("--json", "json_path", default="-", show_default=True, help="output file ('-' = stdout)")
def memory(models: str, dtypes: str, head_layers: int, tail_layers: int, batch_size: int, max_length: int,
           trunk_quants: str, json_path: str) -> None:
    """Peak RSS of a silo and a trunk worker per model and dtype (one training step, LoRA)."""
    from splitfed.bench.command import _emit

    dtype_list = [d.strip() for d in dtypes.split(",") if d.strip()]
    unknown = sorted(set(dtype_list) - {"fp32", "bf16", "fp16"})
    if unknown:
        raise click.BadParameter(f"unknown dtype(s) {unknown}: fp32, bf16 or fp16", param_hint="--dtypes")
    quants = tuple(q.strip() for q in trunk_quants.split(",") if q.strip())
    if set(quants) - {"none", "nf4", "int8"}:
        raise click.BadParameter(f"unknown trunk base(s) {sorted(set(quants) - {'none', 'nf4', 'int8'})}",
                                 param_hint="--trunk-quants")
    doc = measure([m.strip() for m in models.split(",") if m.strip()], dtype_list, head_layers, tail_layers,
                  batch_size, max_length, quants or ("none",))
    _emit(doc, json_path)
