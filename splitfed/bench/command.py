"""`splitfed bench`: measurements with JSON output (never timed tests)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from splitfed.bench.crypto import CIPHER_NAMES, SIZES, bench_seal_open

CRYPTO_SHARE_TARGET = 0.02


class _LazyBenchGroup(click.Group):
    """Benchmarks that load torch are imported only when run (``bench --help`` stays fast)."""

    lazy = {"modes": "splitfed.bench.modes", "faults": "splitfed.bench.faults", "step": "splitfed.bench.step",
            "memory": "splitfed.bench.memory", "wan": "splitfed.bench.wan", "wire": "splitfed.bench.wire"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            return getattr(importlib.import_module(self.lazy[name]), name)
        return super().get_command(ctx, name)


@click.group("bench", cls=_LazyBenchGroup)
def bench() -> None:
    """Benchmarks; each prints (or writes) JSON."""


def _emit(doc: dict, json_path: str | None) -> None:
    text = json.dumps(doc, indent=1)
    if json_path and json_path != "-":
        Path(json_path).write_text(text)
        click.echo(f"wrote {json_path}", err=True)
    else:
        click.echo(text)


@bench.command("crypto")
@click.option("--json", "json_path", default="-", show_default=True, help="output file ('-' = stdout)")
@click.option("--repeats", type=click.IntRange(1), default=20, show_default=True)
@click.option("--model", default="tiny", show_default=True, help="model of the demo run whose step time is split")
@click.option("--silos", type=click.IntRange(1), default=2, show_default=True)
@click.option("--steps", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
def crypto(json_path: str, repeats: int, model: str, silos: int, steps: int, batch_size: int) -> None:
    """Seal+open throughput (1 MiB, 16 MiB; AES-GCM, ChaCha20) and crypto's share of a demo's step time."""
    throughput = []
    for cipher in CIPHER_NAMES:
        for size in SIZES:
            r = bench_seal_open(size, repeats, cipher)
            click.echo(f"{cipher:9} {size >> 20:3d} MiB: seal {r['MBps_seal']:8.1f} MB/s, open {r['MBps_open']:8.1f} MB/s",
                       err=True)
            throughput.append(r)
    click.echo(f"demo run ({model}, {silos} silos x {steps} steps, encrypted) for the step-time share...", err=True)
    with tempfile.TemporaryDirectory(prefix="splitfed-bench-") as tmp:
        out = Path(tmp) / "demo.json"
        proc = subprocess.run(
            [sys.executable, "-m", "splitfed", "demo", "--model", model, "--silos", str(silos), "--steps", str(steps),
             "--local-steps", str(steps), "--batch-size", str(batch_size), "--json", str(out)],
            env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise click.ClickException(f"the demo run failed:\n{proc.stderr[-2000:]}")
        run = json.loads(out.read_text())
    share = {
        "model": model, "silos": silos, "steps_per_silo": steps, "batch_size": batch_size,
        "train_wall_s": run["train_wall_s"], "step_s": round(run["train_wall_s"] / (silos * steps), 5),
        "silo_crypto_s": run["silo_crypto_s"], "trunk_crypto_s": run["trunk_crypto_s"],
        "crypto_share": run["crypto_share"], "target": CRYPTO_SHARE_TARGET,
        "meets_target": run["crypto_share"] < CRYPTO_SHARE_TARGET,
    }
    click.echo(f"crypto share of step time: {100 * share['crypto_share']:.2f}% (target < {100 * CRYPTO_SHARE_TARGET:.0f}%)",
               err=True)
    _emit({"bench": "crypto", "throughput": throughput, "demo_step_share": share}, json_path)

