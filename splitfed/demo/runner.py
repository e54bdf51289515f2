"""Run one local federation to its end and collect its results (used by `demo` and `bench`)."""

from __future__ import annotations

import random
import socket
import sys
import time
from pathlib import Path

import click
from redis import RedisError

from shared.state.redis_acl import shown_url
from shared.state.registry import Registry
from shared.state.run_config import meta_fields
from splitfed.demo.faults import FaultInjector, armed_env, parse_kills
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
from splitfed.demo.netns import NetnsHosts, NetnsUnavailable
from splitfed.demo.redis_server import find_or_start_redis, redis_binary


class RoleFailed(click.ClickException):
    exit_code = 1


# Below Linux's ephemeral range (32768-60999): the kernel never hands these out to outgoing
# connections, so a port found free here stays free until the broker binds it seconds later
# (a port the kernel picked, then released, is soon some client connection's local port).
PORT_RANGE = (20000, 32000)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago, drawn at random below the ephemeral range."""
    chosen: list[int] = []
    rng = random.SystemRandom()
    while len(chosen) < n:
        port = rng.randrange(*PORT_RANGE)
        if port in chosen:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use: draw again
        chosen.append(port)
    return chosen


def run_federation(cfg: DemoConfig, run_dir: Path, key_prefix: str, started: float | None = None
                   ) -> tuple[dict, list[dict]]:
    """Start Redis (if needed), the broker, the trunk workers and the silos; wait; return (result, rows).
    With ``cfg.hosts == "netns"`` the server side and each silo run in network namespaces of their own."""
    if cfg.hosts != "netns":
        return _run_federation(cfg, run_dir, key_prefix, started, None)
    try:
        with NetnsHosts(cfg.silo_ids) as hosts:
            return _run_federation(cfg, run_dir, key_prefix, started, hosts)
    except NetnsUnavailable as exc:
        raise click.ClickException(f"--hosts netns: {exc} (it needs root or CAP_NET_ADMIN)") from None


def _run_federation(cfg: DemoConfig, run_dir: Path, key_prefix: str, started: float | None,
                    hosts: NetnsHosts | None) -> tuple[dict, list[dict]]:
    started = time.perf_counter() if started is None else started
    faults = parse_kills(cfg.kills, cfg.silo_ids, cfg.worker_ids)
    if hosts is not None:  # Redis on the server host, where the silos cannot reach it
        if any(f.role == "redis" for f in faults):
            raise click.UsageError("--kill redis@... is not supported with --hosts netns")
        url, private_redis = hosts.start_redis(redis_binary() or "redis-server", run_dir), None
    else:
        url, private_redis = find_or_start_redis(private_persistent=any(f.role == "redis" for f in faults))
    run_id = new_run_id()
    registry = Registry(url, key_prefix, run_id)
    registry.create_run({"mode": cfg.mode, "silos": ",".join(cfg.silo_ids), "steps": cfg.steps,
                         "local_steps": cfg.local_steps, "model": cfg.model, "adapter": cfg.adapter, "status": "running",
                         **meta_fields(cfg.run_config())})  # the reference every role's settings must agree with
    click.echo(f"run {run_id}: Redis {shown_url(url)}, logs in {run_dir / 'logs'}", err=True)
    fed = Federation(run_dir / "logs", {"SPLITFED_REDIS_URL": url, "SPLITFED_RUN_ID": run_id,
                                         "SPLITFED_KEY_PREFIX": key_prefix, **cfg.model_env()})
    status, not_exited = "failed", []
    try:
        data = write_silo_data(run_dir, cfg)
        keys_env = make_throwaway_keys(run_dir, cfg, registry)
        for role, extra in [*make_curve_certificates(run_dir, cfg).items(), *armed_env(faults).items(),
                            *cfg.role_envs().items()]:
            keys_env[role] = {**keys_env.get(role, {}), **extra}
        launch(fed, cfg, tuple(free_ports(2)), data, run_dir, keys_env, hosts)
        not_exited = supervise(fed, cfg, registry, FaultInjector(faults, fed, private_redis, cfg.silo_ids))
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
        trunk_info = [registry.info("trunk", w) for w in cfg.worker_ids]
        trunk_crypto_s = sum(float(i.get("crypto_s", 0.0)) for i in trunk_info)
        trunk_peak_rss_mb = max((float(i.get("peak_rss_mb", 0.0)) for i in trunk_info), default=0.0)
        trunk_recomputed = sum(int(i.get("recomputed_steps", 0)) for i in trunk_info)
        rejected = registry.rejected()
        registry.set_run_status(status)
        registry.expire_run(RUN_TTL_S)
        if private_redis is not None:
            private_redis.stop()
    fed_wall = time.perf_counter() - started

    rows, train_s, crypto_s = collect_losses(run_dir, cfg)
    result = {"mode": cfg.mode, "silos": cfg.silos, "steps": cfg.steps, "local_steps": cfg.local_steps,
              "aggregation": cfg.aggregation, "personalize": cfg.personalize, "workers": cfg.workers,
              "model": cfg.model, "adapter": cfg.adapter, "seed": cfg.seed, "run_id": run_id,
              "encryption": cfg.encryption, "curve": cfg.curve, "rejected_frames": rejected,
              "losses": [r["loss"] for r in rows], "schedule": [[r["silo"], r["step"]] for r in rows],
              "step_end_times": [r.get("t") for r in rows],
              "trunk_updates": [r.get("trunk_seq") for r in rows],  # which trunk update each step was in
              "micro_batches": [r.get("micro_batches", 1) for r in rows],
              "wall_s": round(fed_wall, 3), "train_wall_s": round(train_s, 3),
              "silo_crypto_s": round(crypto_s, 4), "trunk_crypto_s": round(trunk_crypto_s, 4),
              # serial mode: every seal/open is on the critical path of the steps
              "crypto_share": round((crypto_s + trunk_crypto_s) / max(train_s, 1e-9), 5)}
    result["trunk_peak_rss_mb"] = trunk_peak_rss_mb
    result["trunk_recomputed_steps"] = trunk_recomputed  # --recompute-forward: forwards run twice
    result["faults"] = [f.as_dict() for f in faults]
    result["servers_stopped_by_signal"] = not_exited  # [] when broker and workers exited by themselves (--burst)
    return result, rows


def supervise(fed: Federation, cfg: DemoConfig, registry: Registry, faults: FaultInjector | None = None) -> list[str]:
    """Wait for every silo to finish; if any role dies (other than by fault injection), stop and show why.
    Returns the servers that did not exit by themselves after the silos (--burst) and had to be stopped."""
    faults = faults or FaultInjector([], fed, None, cfg.silo_ids)
    progress = Progress(registry, cfg)
    try:
        next_status = 0.0
        while True:
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + 0.5
                try:
                    progress.update()
                except RedisError:
                    pass  # Redis restarting (a fault being injected): the roles retry, so does the status line
            faults.poll()
            failed = {n: c for n, c in fed.failed().items() if n not in faults.awaiting_restart()}
            if failed:
                name, code = next(iter(failed.items()))
                raise RoleFailed(f"{name} exited with code {code}; last lines of its log:\n{fed.tail(name)}")
            if all(s in fed.exited() for s in cfg.silo_ids):
                return wait_for_servers(fed, ["broker", *cfg.worker_ids])
            time.sleep(0.05 if faults.faults else 0.5)
    finally:
        progress.done()


def wait_for_servers(fed: Federation, names: list[str], timeout_s: float = 30.0) -> list[str]:
    """The broker and workers run with --burst: once the silos are done they exit 0 by themselves
    (the demo's final fed.stop() only SIGTERMs what is still up after this wait, and says so)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(n in fed.exited() for n in names):
        time.sleep(0.1)
    if still := [n for n in names if n not in fed.exited()]:
        click.echo(f"{', '.join(still)} still running {timeout_s:.0f}s after the silos finished: stopping them", err=True)
        return still
    if failed := {n: c for n, c in fed.exited().items() if n in names and c != 0}:
        name, code = next(iter(failed.items()))
        raise RoleFailed(f"{name} exited with code {code} after the run; last lines of its log:\n{fed.tail(name)}")
    return []
