"""`splitfed demo`: a whole local federation in one command, with an optional centralized check."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import click

from shared.centralized import centralized_serial
from shared.models import resolve_model_dir
from shared.registry import Registry
from splitfed.demo.federation_run import (
    RUN_TTL_S,
    DemoConfig,
    Progress,
    collect_losses,
    launch,
    make_curve_certificates,
    make_throwaway_keys,
    new_run_id,
    write_silo_data,
)
from splitfed.demo.processes import Federation
from splitfed.demo.redis_server import find_or_start_redis
from splitfed.demo.summary import print_summary


class RoleFailed(click.ClickException):
    exit_code = 1


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@click.command("demo")
@click.option("--mode", type=click.Choice(["serial", "client-batch", "hierarchical"]), default="serial", show_default=True)
@click.option("--silos", type=click.IntRange(1, 64), default=2, show_default=True, help="number of silo agents")
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="training steps per silo")
@click.option("--local-steps", type=click.IntRange(1), default=10, show_default=True, help="steps per round (K)")
@click.option("--model", default="smollm2", show_default=True, help="'smollm2', 'tiny' or a model directory")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option("--max-length", type=click.IntRange(8), default=128, show_default=True)
@click.option("--adapter", type=click.Choice(["lora", "prefix", "full"]), default="lora", show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--wire-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--encryption/--no-encryption", default=True, show_default=True,
              help="seal every tensor end to end (throwaway keys are generated and enrolled for the run)")
@click.option("--curve", is_flag=True, help="also CurveZMQ on every socket, with a ZAP allow-list at the broker")
@click.option("--check-centralized", is_flag=True, help="also train in one process without network and compare losses")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write the run's results here")
@click.option("--key-prefix", default="splitfed", show_default=True, envvar="SPLITFED_KEY_PREFIX",
              help="namespace of the run's Redis keys [env SPLITFED_KEY_PREFIX]")
@click.option("--run-dir", type=click.Path(path_type=Path), help="keep logs, data and weights here (default: a temp dir, removed on success)")
def demo(json_path: Path | None, check_centralized: bool, run_dir: Path | None, key_prefix: str, **options) -> None:
    """Start Redis, a broker, a trunk worker and N silos as processes, train, and summarise."""
    cfg = DemoConfig(**options)
    if cfg.mode != "serial":
        raise click.UsageError(f"--mode {cfg.mode} is not implemented yet (issue: parallel modes); use --mode serial")
    started = time.perf_counter()
    click.echo(f"splitfed demo: {cfg.mode} mode, {cfg.silos} silos x {cfg.steps} steps, model {cfg.model}, "
               f"{'encrypted end to end' if cfg.encryption else 'NOT encrypted'}", err=True)
    model_dir = resolve_model_dir(cfg.model)  # build/convert once here, so the roles only load
    keep_dir = run_dir is not None
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="splitfed-demo-"))
    run_dir.mkdir(parents=True, exist_ok=True)

    url, private_redis = find_or_start_redis()
    run_id = new_run_id()
    registry = Registry(url, key_prefix, run_id)
    registry.create_run({"mode": cfg.mode, "silos": ",".join(cfg.silo_ids), "steps": cfg.steps,
                         "local_steps": cfg.local_steps, "model": cfg.model, "adapter": cfg.adapter, "status": "running"})
    click.echo(f"run {run_id}: Redis {url}, logs in {run_dir / 'logs'}", err=True)
    fed = Federation(run_dir / "logs", {"SPLITFED_REDIS_URL": url, "SPLITFED_RUN_ID": run_id,
                                         "SPLITFED_KEY_PREFIX": key_prefix, **cfg.model_env()})
    status = "failed"
    try:
        data = write_silo_data(run_dir, cfg)
        keys_env = make_throwaway_keys(run_dir, cfg, registry)
        for role, extra in make_curve_certificates(run_dir, cfg).items():
            keys_env[role] = {**keys_env.get(role, {}), **extra}
        launch(fed, cfg, tuple(_free_ports(2)), data, run_dir, keys_env)
        _supervise(fed, cfg, registry)
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        click.echo("\ninterrupted: stopping every role", err=True)
        sys.exit(130)
    except RoleFailed:
        click.echo(f"logs and data kept in {run_dir}", err=True)
        raise
    finally:
        fed.stop()
        trunk_crypto_s = float(registry.info("trunk", "trunk0").get("crypto_s", 0.0))
        rejected = registry.rejected()
        registry.set_run_status(status)
        registry.expire_run(RUN_TTL_S)
        if private_redis is not None:
            private_redis.stop()
    fed_wall = time.perf_counter() - started

    rows, train_s, crypto_s = collect_losses(run_dir, cfg)
    result = {"mode": cfg.mode, "silos": cfg.silos, "steps": cfg.steps, "local_steps": cfg.local_steps,
              "model": cfg.model, "adapter": cfg.adapter, "seed": cfg.seed, "run_id": run_id,
              "encryption": cfg.encryption, "curve": cfg.curve, "rejected_frames": rejected,
              "losses": [r["loss"] for r in rows], "schedule": [[r["silo"], r["step"]] for r in rows],
              "wall_s": round(fed_wall, 3), "train_wall_s": round(train_s, 3),
              "silo_crypto_s": round(crypto_s, 4), "trunk_crypto_s": round(trunk_crypto_s, 4),
              # serial mode: every seal/open is on the critical path of the steps
              "crypto_share": round((crypto_s + trunk_crypto_s) / max(train_s, 1e-9), 5)}
    if check_centralized:
        click.echo("centralized reference: same parts, data order and optimizer in one process...", err=True)
        t0 = time.perf_counter()
        ref = centralized_serial(model_dir, cfg, [run_dir / "data" / f"{s}.jsonl" for s in cfg.silo_ids])
        result["centralized_wall_s"] = round(time.perf_counter() - t0, 3)
        by_key = {(r["silo_index"], r["step"]): r["loss"] for r in ref}
        result["centralized_losses"] = [by_key[(r["silo_index"], r["step"])] for r in rows]
        result["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(result["losses"], result["centralized_losses"]))
    print_summary(result, rows)
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))
        click.echo(f"wrote {json_path}", err=True)
    if not keep_dir:
        shutil.rmtree(run_dir, ignore_errors=True)


def _supervise(fed: Federation, cfg: DemoConfig, registry: Registry) -> None:
    """Wait for every silo to finish; if any role dies, stop and show why."""
    progress = Progress(registry, cfg)
    try:
        while True:
            progress.update()
            failed = fed.failed()
            if failed:
                name, code = next(iter(failed.items()))
                raise RoleFailed(f"{name} exited with code {code}; last lines of its log:\n{fed.tail(name)}")
            if all(s in fed.exited() for s in cfg.silo_ids):
                return
            time.sleep(0.5)
    finally:
        progress.done()
