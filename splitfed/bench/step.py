"""`splitfed bench step`: the split training step against the centralized one, side by side.

One run per wire dtype. The broker and the trunk worker are real processes (ZeroMQ over TCP
loopback, encryption on, serial mode); the silo agent runs inside this process, and after each of
its steps this process runs the centralized step (the unsplit model with the same adapter, on the
same batch) -- so the two are interleaved step by step and every pair is timed under the same load
of a shared machine. Both start from the same weights and see the same batches, so their losses
must agree (fp32 on the wire: to rounding; bf16/fp16: the dtype's effect on the loss, reported).

The split step's parts come from the roles' own per-step timelines (shared/runtime/step_timeline.py):
the silo's from this process, the trunk's from its Redis hash, written once when it exits.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
import torch

from shared.data.dataset import SiloDataset, load_jsonl
from shared.model.loss import causal_lm_loss
from shared.model.microbatch import split_batch
from shared.model.part_loading import load_config
from shared.model.model_split import positions_from_mask
from shared.model.models import resolve_model_dir
from shared.model.optim import make_optimizer
from shared.wire.compression import hidden_bytes_per_token
from shared.wire.protocol import WIRE_DTYPE_BY_NAME
from splitfed.reference.reference import UnsplitModel
from shared.state.registry import Registry
from shared.runtime.settings import ModelSettings, SiloSettings
from shared.data.tokenizer import load_tokenizer
from splitfed.bench.step_report import summarize

BYTES_TARGET = 1.02  # bytes on the wire per step <= 1.02 x 4*B*T*H*itemsize
RATIO_TARGET = 1.05


class CentralizedStep:
    """The unsplit model trained on the silo's own batches, one step per call, timed."""

    def __init__(self, model_dir: Path, settings: ModelSettings, data: Path, batch_size: int, max_length: int,
                 micro_batches: int) -> None:
        self.model = UnsplitModel(model_dir, settings.adapter_config(), settings.seed, settings.head_layers,
                                  settings.tail_layers)
        self.optimizer = make_optimizer(self.model.trainable, settings.lr, settings.weight_decay)
        self.dataset = SiloDataset(load_jsonl(data), load_tokenizer(model_dir), batch_size, max_length,
                                   settings.seed, 0)
        self.micro_batches = micro_batches
        self.times: dict[int, float] = {}
        self.losses: dict[int, float] = {}
        self.tokens: dict[int, int] = {}  # B*T of each step's padded batch: the wire's ideal scales with it

    def __call__(self, step: int) -> None:
        batch = self.dataset.batch(step)
        self.tokens[step] = batch.input_ids.numel()
        started = time.perf_counter()
        total = 0.0
        for mb, weight in split_batch(batch, self.micro_batches):
            logits = self.model(mb.input_ids, mb.attention_mask, positions_from_mask(mb.attention_mask))
            loss = causal_lm_loss(logits, mb.labels) * weight
            loss.backward()
            total += float(loss.detach())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times[step] = time.perf_counter() - started
        self.losses[step] = total


def run_pair(model: str, wire_dtype: str, batch_size: int, max_length: int, adapter: str, warmup: int,
             steps: int, micro_batches: int, tmp: Path, prefix: str) -> dict:
    """One federation (broker + trunk processes, in-process silo) beside the centralized step."""
    from silo_agent.agent import SiloAgent
    from splitfed.demo.federation_run import (
        DemoConfig,
        launch_servers,
        make_throwaway_keys,
        new_run_id,
        write_silo_data,
    )
    from splitfed.demo.processes import Federation
    from splitfed.demo.redis_server import find_or_start_redis
    from splitfed.demo.runner import free_ports

    total = warmup + steps
    cfg = DemoConfig(mode="serial", silos=1, steps=total, local_steps=total, model=model, batch_size=batch_size,
                     max_length=max_length, adapter=adapter, wire_dtype=wire_dtype, aggregation="none")
    run_dir = tmp / f"{wire_dtype}-mb{micro_batches}"
    url, private_redis = find_or_start_redis()
    run_id = new_run_id().replace("demo", "bench")
    registry = Registry(url, prefix, run_id)
    registry.create_run({"mode": "serial", "silos": "silo0", "steps": total, "model": model, "status": "running"})
    fed = Federation(run_dir / "logs", {"SPLITFED_REDIS_URL": url, "SPLITFED_RUN_ID": run_id,
                                         "SPLITFED_KEY_PREFIX": prefix, **cfg.model_env()})
    try:
        data = write_silo_data(run_dir, cfg)
        keys_env = make_throwaway_keys(run_dir, cfg, registry)
        front = launch_servers(fed, cfg, tuple(free_ports(2)), keys_env, run_dir)
        model_dir = resolve_model_dir(model)
        silo_settings = SiloSettings(
            run_id=run_id, model=model, adapter=adapter,
            wire_dtype=wire_dtype, micro_batches=micro_batches, broker_frontend=front, silo_id="silo0",
            data=data[0], steps=total, local_steps=total, batch_size=batch_size, max_length=max_length,
            keys_dir=Path(keys_env["silo0"]["SPLITFED_KEYS_DIR"]),
            trunk_fingerprint=keys_env["silo0"]["SPLITFED_TRUNK_FINGERPRINT"], report_loss=False)
        centralized = CentralizedStep(model_dir, silo_settings, data[0], batch_size, max_length, micro_batches)
        agent = SiloAgent(silo_settings, model_dir)
        click.echo(f"[bench step] {model}, wire {wire_dtype}, {micro_batches} micro-batch(es): "
                   f"{warmup} warm-up + {steps} timed steps, each split step followed by a centralized one", err=True)
        agent.run(between_steps=centralized)
        fed.stop()  # the trunk publishes its timeline as it exits
        failed = {n: c for n, c in fed.exited().items() if c not in (0, -15)}
        if failed:
            raise click.ClickException(f"roles failed: {failed}\n{fed.tail('trunk0')}")
        trunk_rows = _json_rows(registry.info("trunk", "trunk0").get("timeline"))
    finally:
        fed.stop()
        registry.expire_run(3600)
        if private_redis is not None:
            private_redis.stop()
    silo_rows = list(agent.timeline.rows)
    split_losses = {h["step"]: h["loss"] for h in agent.history}
    row = hidden_bytes_per_token(wire_dtype, load_config(model_dir).hidden_size)  # int8: values + its scale
    ideal = {s: 4 * n * row for s, n in centralized.tokens.items()}  # h1, h2, dL/dh2, dL/dh1
    return summarize(silo_rows, trunk_rows, centralized.times, centralized.losses, split_losses, warmup, ideal)


def _json_rows(text: str | None) -> list[dict]:
    import json

    if not text:
        raise click.ClickException("the trunk worker published no timeline (did it stop cleanly?)")
    return json.loads(text)


@click.command("step")
@click.option("--model", default="tiny-256", show_default=True,
              help="'tiny-256' (Llama, hidden 256, 8 layers, vocab 32000), 'smollm2', 'tiny' or a model directory")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="default: 8 (tiny models), 1 (others)")
@click.option("--max-length", type=click.IntRange(8), default=128, show_default=True)
@click.option("--adapter", type=click.Choice(["lora", "prefix", "full"]), default="lora", show_default=True)
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="timed steps (medians over these)")
@click.option("--warmup", type=click.IntRange(1), default=5, show_default=True, help="untimed steps first")
@click.option("--wire-dtypes", default="fp32", show_default=True,
              help="comma-separated wire dtypes, one federation each (e.g. fp32,bf16,fp16)")
@click.option("--micro-batches", type=click.IntRange(1), default=1, show_default=True,
              help="micro-batches per step (gradient accumulation; the silo overlaps them with the trunk)")
@click.option("--key-prefix", default="splitfed-bench", show_default=True, help="Redis namespace of the bench runs")
@click.option("--json", "json_path", default="-", show_default=True, help="output file ('-' = stdout)")
def step(model: str, batch_size: int | None, max_length: int, adapter: str, steps: int, warmup: int,
         wire_dtypes: str, micro_batches: int, key_prefix: str, json_path: str) -> None:
    """Split vs centralized step time side by side, bytes on the wire, where the split step's time goes."""
    from splitfed.bench.command import _emit

    dtypes = [d.strip() for d in wire_dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in WIRE_DTYPE_BY_NAME for d in dtypes):
        raise click.BadParameter(f"comma-separated, of {sorted(WIRE_DTYPE_BY_NAME)}", param_hint="--wire-dtypes")
    if batch_size is None:
        batch_size = 8 if model.startswith("tiny") else 1
    config = load_config(resolve_model_dir(model))
    hidden = config.hidden_size
    doc = {"bench": "step", "model": model, "hidden_size": hidden, "layers": config.num_hidden_layers,
           "vocab_size": config.vocab_size, "batch_size": batch_size, "max_length": max_length, "adapter": adapter,
           "micro_batches": micro_batches, "warmup": warmup, "timed_steps": steps, "mode": "serial",
           "encryption": True, "transport": "ZeroMQ TCP loopback via the broker", "trunk_device": "cpu",
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_before": [round(x, 2) for x in os.getloadavg()], "targets": {"ratio": RATIO_TARGET,
                                                                              "bytes": BYTES_TARGET},
           "runs": []}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="splitfed-bench-step-") as tmp:
        for dtype in dtypes:
            r = run_pair(model, dtype, batch_size, max_length, adapter, warmup, steps, micro_batches, Path(tmp), key_prefix)
            r = {"wire_dtype": dtype, **r}
            r["meets"] = {"ratio": r["ratio"] <= RATIO_TARGET, "bytes": r["bytes_vs_ideal"] <= BYTES_TARGET}
            click.echo(f"[bench step] wire {dtype}: split {1000 * r['split_s']:.1f} ms, centralized "
                       f"{1000 * r['centralized_s']:.1f} ms, ratio {r['ratio']:.3f} (paired {r['paired_ratio']:.3f}); "
                       f"{r['bytes_per_step']} B/step = {r['bytes_vs_ideal']:.4f} x ideal; "
                       f"loss vs centralized max {r['loss_diff']['max']:.2e}", err=True)
            click.echo("[bench step]   " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["breakdown_ms"].items()), err=True)
            doc["runs"].append(r)
    doc["load_after"] = [round(x, 2) for x in os.getloadavg()]
    _emit(doc, json_path)

