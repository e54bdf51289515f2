"""`splitfed bench modes`: samples/s of each training mode beside centralized training at batch M*b,
and the trunk worker's peak memory in hierarchical mode for few and many silos.

Every federation is a real `splitfed demo` run (processes, ZeroMQ TCP, encryption on, secure
aggregation every K steps). The first round (K steps) is the warm-up: its aggregation is a barrier
that every silo passes together, so the timed steps (all later ones) start at the same moment in
every mode, and process start-up, model loading and start-up skew are not counted. Centralized runs in this process on the same machine right after: one unsplit
model with the same adapter, each step one batch of M*b examples (the silos' batches together).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import torch

from shared.data.dataset import SiloDataset, collate, load_jsonl
from shared.model.loss import causal_lm_loss
from shared.model.model_split import positions_from_mask
from shared.model.models import resolve_model_dir
from shared.model.optim import make_optimizer
from splitfed.reference.reference import UnsplitModel
from shared.runtime.settings import ModelSettings
from shared.data.tokenizer import load_tokenizer

MODES = ("serial", "client-batch", "hierarchical")
STEPS_PER_SILO = 3  # of each hierarchical memory run: one round


def run_demo(args: list[str], tmp: Path, name: str) -> dict:
    out = tmp / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", "splitfed", "demo", "--json", str(out), *args],
                          env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"demo {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def federated_throughput(run: dict, batch_size: int, warmup: int) -> dict:
    ends = [(t, step) for t, (_, step) in zip(run["step_end_times"], run["schedule"])]
    start = max(t for t, step in ends if step == warmup - 1)  # the warm-up round's last step ends
    timed = [t for t, step in ends if step >= warmup]
    seconds = max(timed) - start
    return {"samples": len(timed) * batch_size, "seconds": round(seconds, 3),
            "samples_per_s": round(len(timed) * batch_size / seconds, 2)}


def centralized_throughput(model_dir: Path, data_paths: list[Path], batch_size: int, max_length: int, steps: int,
                           warmup: int, adapter: str) -> dict:
    """One model, batch = the M silos' step-k batches together: what pooling the data would give."""
    settings = ModelSettings(model=str(model_dir), adapter=adapter)
    model = UnsplitModel(model_dir, settings.adapter_config(), settings.seed)
    optimizer = make_optimizer(model.trainable, settings.lr, settings.weight_decay)
    tokenizer = load_tokenizer(model_dir)
    datasets = [SiloDataset(load_jsonl(p), tokenizer, batch_size, max_length, 0, i) for i, p in enumerate(data_paths)]
    times = []
    for step in range(warmup + steps):
        picks = [d.encoded[i] for d in datasets for i in
                 d.epoch_order(step // d.batches_per_epoch)[(step % d.batches_per_epoch) * batch_size:][:batch_size]]
        batch = collate(picks, tokenizer.pad_token_id)
        started = time.perf_counter()
        logits = model(batch.input_ids, batch.attention_mask, positions_from_mask(batch.attention_mask))
        causal_lm_loss(logits, batch.labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {"batch": len(datasets) * batch_size, "median_step_s": round(median, 5),
            "samples_per_s": round(len(datasets) * batch_size / median, 2)}


def modes_throughput(model: str, silo_counts: list[int], steps: int, batch_size: int, max_length: int,
                     warmup: int, tmp: Path) -> list[dict]:
    model_dir = resolve_model_dir(model)
    rows = []
    for m in silo_counts:
        row: dict = {"silos": m}
        for mode in MODES:
            click.echo(f"[bench modes] {m} silos, {mode}...", err=True)
            run_dir = tmp / f"{mode}-{m}"
            run = run_demo(["--model", model, "--mode", mode, "--silos", str(m), "--steps", str(warmup + steps),
                            "--local-steps", str(warmup), "--batch-size", str(batch_size),
                            "--max-length", str(max_length), "--run-dir", str(run_dir)], tmp, f"{mode}-{m}")
            row[mode] = federated_throughput(run, batch_size, warmup)
        click.echo(f"[bench modes] {m} silos, centralized at batch {m * batch_size}...", err=True)
        data = sorted((tmp / f"serial-{m}" / "data").glob("silo*.jsonl"), key=lambda p: int(p.stem[4:]))
        row["centralized"] = centralized_throughput(model_dir, data, batch_size, max_length, steps, warmup, "lora")
        for mode in MODES:
            row[mode]["vs_centralized"] = round(row[mode]["samples_per_s"] / row["centralized"]["samples_per_s"], 3)
        click.echo("[bench modes] " + ", ".join(f"{k} {row[k]['samples_per_s']} samples/s"
                                                for k in (*MODES, "centralized")), err=True)
        rows.append(row)
    return rows


def hierarchical_memory(model: str, silo_counts: list[int], tmp: Path, inflight: tuple[int, ...] = (1, 2),
                        concurrent: int = 1) -> dict:
    """Peak RSS of the one trunk worker serving N silos, each with its own LoRA trunk adapter, for
    each bound on the steps a worker keeps open (each open step holds its activations).

    Every silo takes STEPS_PER_SILO steps (one round), so N silos make the worker serve N times as
    many steps. A worker's heap creeps a little with the steps it serves, whoever sends them, so
    one silo also runs as many steps as the largest run's silos together: the ratio against that
    run (``vs_one_silo_same_trunk_steps``) is the cost of the silos alone; ``vs_first`` is the
    plain ratio against the first silo count. With more than one open step, the largest run once
    more with --recompute-forward (each open step holds only its input).

    ``concurrent``: demos run at once. A peak RSS is each worker process's own, so running several
    side by side changes no figure, only the wall time (the tests use it); one at a time by default,
    so a person watching sees one run's progress."""
    model_dir = resolve_model_dir(model)
    out = {"model": model, "adapter": "lora", "batch_size": 1, "max_length": 128, "runs": []}
    most = max(silo_counts)
    plan = []
    for k in inflight:
        plan += [(n, STEPS_PER_SILO, k, False) for n in silo_counts]
        if most > 1:
            plan.append((1, STEPS_PER_SILO * most, k, False))
        if k > 1:  # several open steps, each holding only its input (--recompute-forward)
            plan.append((most, STEPS_PER_SILO, k, True))

    def run(entry: tuple[int, int, int, bool]) -> dict:
        n, steps, k, recompute = entry
        click.echo(f"[bench modes] hierarchical memory: {model}, {n} silos x {steps} steps on one trunk worker, "
                   f"max {k} open steps{', forwards recomputed' if recompute else ''}...", err=True)
        done = run_demo(["--model", model, "--mode", "hierarchical", "--silos", str(n), "--steps", str(steps),
                         "--local-steps", str(steps), "--batch-size", "1", "--max-length", "128",
                         "--max-inflight", str(k), *(["--recompute-forward"] if recompute else [])],
                        tmp, f"mem-{n}-{steps}-{k}-{int(recompute)}")
        return {"silos": n, "steps_per_silo": steps, "trunk_steps": n * steps, "max_inflight": k,
                "recompute_forward": recompute, "trunk_peak_rss_mb": done["trunk_peak_rss_mb"]}

    with ThreadPoolExecutor(max(1, concurrent)) as pool:
        out["runs"] = list(pool.map(run, plan))
    plain = [r for r in out["runs"] if not r["recompute_forward"]]
    first = {r["max_inflight"]: r["trunk_peak_rss_mb"] for r in plain
             if r["silos"] == silo_counts[0] and r["steps_per_silo"] == STEPS_PER_SILO}
    alone = {r["max_inflight"]: r["trunk_peak_rss_mb"] for r in plain
             if r["silos"] == 1 and r["trunk_steps"] == most * STEPS_PER_SILO}
    for r in out["runs"]:
        r["vs_first"] = round(r["trunk_peak_rss_mb"] / first[r["max_inflight"]], 3)
        if r["silos"] == most and most > 1:
            r["vs_one_silo_same_trunk_steps"] = round(r["trunk_peak_rss_mb"] / alone[r["max_inflight"]], 3)
    base = first[inflight[0]]
    trunk_params = sum(t.numel() * t.element_size() for t in _trunk_tensors(model_dir))
    out["trunk_weights_mb"] = round(trunk_params / 2**20, 1)
    out["copy_per_silo_estimate_mb"] = {n: round(base + (n - 1) * trunk_params / 2**20, 1) for n in silo_counts}
    return out


def _trunk_tensors(model_dir: Path):
    from shared.model.part_loading import build_part

    return list(build_part(model_dir, "trunk").parameters())


@click.command("modes")
@click.option("--silos", "silos_text", default="1,2,4,8", show_default=True, help="comma-separated silo counts M")
@click.option("--model", default="tiny", show_default=True, help="model of the throughput runs")
@click.option("--steps", type=click.IntRange(2), default=10, show_default=True, help="timed steps per silo")
@click.option("--local-steps", "warmup", type=click.IntRange(1), default=5, show_default=True,
              help="K, steps per round; the first round is the warm-up")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True, help="b, per silo")
@click.option("--max-length", type=click.IntRange(8), default=128, show_default=True)
@click.option("--memory-model", default="smollm2", show_default=True, help="model of the hierarchical memory runs")
@click.option("--memory-silos", default="1,16", show_default=True, help="silo counts of the memory runs ('' skips)")
@click.option("--json", "json_path", default="-", show_default=True, help="output file ('-' = stdout)")
def modes(silos_text: str, model: str, steps: int, warmup: int, batch_size: int, max_length: int,
          memory_model: str, memory_silos: str, json_path: str) -> None:
    """Samples/s per mode beside centralized at batch M*b; hierarchical trunk memory for few vs many silos."""
    from splitfed.bench.command import _emit

    try:
        counts = [int(x) for x in silos_text.split(",") if x.strip()]
        memory_counts = [int(x) for x in memory_silos.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter("comma-separated integers, e.g. 1,2,4,8") from None
    if (not counts and not memory_counts) or min(counts + memory_counts) < 1:
        raise click.BadParameter("silo counts >= 1 ('' skips the throughput or the memory part)", param_hint="--silos")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="splitfed-bench-modes-") as tmp:
        doc = {"bench": "modes", "model": model, "batch_size": batch_size, "max_length": max_length,
               "timed_steps": steps, "warmup": warmup, "torch_threads": torch.get_num_threads(),
               "load_average": os.getloadavg()}
        if counts:
            doc["throughput"] = modes_throughput(model, counts, steps, batch_size, max_length, warmup, Path(tmp))
        if memory_counts:
            doc["hierarchical_memory"] = hierarchical_memory(memory_model, memory_counts, Path(tmp))
    _emit(doc, json_path)
