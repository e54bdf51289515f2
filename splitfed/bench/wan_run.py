"""One federation of `splitfed bench wan`: the demo's roles in network namespaces, each silo behind a
delaying relay on a rate-limited link, trained through a list of profile phases.

The server side (Redis, broker, trunk) runs in one namespace, each silo in its own
(splitfed/demo/netns.py). With ``relay`` each silo reaches the broker through its relay; without,
directly over its veth link (the plain loopback reference that shows the relay's own cost). The
silos get a step count they never reach: the phases decide how long the run lasts, and a SIGTERM
(a warm stop: each silo finishes its step, says DISCONNECT and writes its results) ends it.
"""

from __future__ import annotations

import json
import signal
import statistics
import time
from pathlib import Path

import click

from shared.state.registry import Registry
from shared.state.run_config import meta_fields
from splitfed.bench.wan_profiles import Profile, phase_throughput
from splitfed.demo.federation_run import (RUN_TTL_S, DemoConfig, launch_servers, make_throwaway_keys, new_run_id,
                                          write_silo_data)
from splitfed.demo.netns import NetnsHosts
from splitfed.demo.processes import Federation
from splitfed.demo.redis_server import redis_binary
from splitfed.demo.runner import RoleFailed, free_ports, supervise

ENDLESS_STEPS = 100_000  # never reached: the last phase's end stops the silos


def _progress(registry: Registry, silo_ids: list[str]) -> dict[str, int]:
    """Each silo's latest finished step as it last reported it (-1: none yet); reports come at
    most once a heartbeat, so this lags by up to a second: it only decides when a phase may end."""
    out = {}
    for sid in silo_ids:
        step = registry.info("silo", sid).get("step")
        out[sid] = int(step) if step is not None else -1
    return out


def _wait_steps(fed: Federation, registry: Registry, silo_ids: list[str], target: dict[str, int], min_s: float,
                max_s: float) -> None:
    """Until every silo reported step >= its target and ``min_s`` passed, or ``max_s`` passed."""
    started = time.monotonic()
    while time.monotonic() - started < max_s:
        if failed := fed.failed():
            name, code = next(iter(failed.items()))
            raise RoleFailed(f"{name} exited with code {code}; last lines of its log:\n{fed.tail(name)}")
        done = _progress(registry, silo_ids)
        if time.monotonic() - started >= min_s and all(done[s] >= target[s] for s in silo_ids):
            return
        time.sleep(0.2)


def _apply(hosts: NetnsHosts, silo_ids: list[str], profile: Profile, relay: bool) -> None:
    for sid in silo_ids:
        if relay:
            hosts.set_delay(sid, profile.delay_ms)
        hosts.shape(sid, profile.rate_mbit)


def run_phases(cfg: DemoConfig, run_dir: Path, key_prefix: str, phases: list[Profile], *, relay: bool,
               micro_batches: int, warmup_steps: int, steps_per_phase: int, min_phase_s: float,
               max_phase_s: float) -> dict:
    """Train through ``phases``; returns each phase's samples/s and the trunk's busy time per step."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with NetnsHosts(cfg.silo_ids) as hosts:
        url = hosts.start_redis(redis_binary() or "redis-server", run_dir)
        registry = Registry(url, key_prefix, new_run_id())
        registry.create_run({"mode": cfg.mode, "silos": ",".join(cfg.silo_ids), "steps": cfg.steps,
                             "local_steps": cfg.local_steps, "model": cfg.model, "adapter": cfg.adapter,
                             "status": "running", **meta_fields(cfg.run_config())})
        fed = Federation(run_dir / "logs", {"SPLITFED_REDIS_URL": url, "SPLITFED_RUN_ID": registry.run_id,
                                             "SPLITFED_KEY_PREFIX": key_prefix, **cfg.model_env()})
        marks = []
        try:
            data = write_silo_data(run_dir, cfg)
            keys_env = make_throwaway_keys(run_dir, cfg, registry)
            ports = free_ports(2 + cfg.silos)
            launch_servers(fed, cfg, (ports[0], ports[1]), keys_env, run_dir, hosts)
            for i, sid in enumerate(cfg.silo_ids):
                front = (hosts.start_relay(sid, ports[2 + i], ports[0], run_dir) if relay
                         else f"tcp://{hosts.server_address_for(sid)}:{ports[0]}")
                fed.start(sid, ["silo", "--broker-frontend", front, "--silo-id", sid, "--silo-index", str(i),
                                "--data", str(data[i]), "--steps", str(cfg.steps), "--local-steps", str(cfg.local_steps),
                                "--batch-size", str(cfg.batch_size), "--max-length", str(cfg.max_length),
                                "--step-timeout-s", str(cfg.step_timeout_s),
                                "--results", str(run_dir / "results" / f"{sid}.json")],
                          env={**keys_env.get(sid, {}), "SPLITFED_MICRO_BATCHES": str(micro_batches)},
                          prefix=tuple(hosts.prefix(sid)))
            _wait_steps(fed, registry, cfg.silo_ids, {s: warmup_steps - 1 for s in cfg.silo_ids}, 0, 600)
            for profile in phases:
                _apply(hosts, cfg.silo_ids, profile, relay)
                begun = _progress(registry, cfg.silo_ids)
                start = time.time()
                # +1: the step under way at the switch does not count
                _wait_steps(fed, registry, cfg.silo_ids, {s: begun[s] + steps_per_phase + 1 for s in cfg.silo_ids},
                            min_phase_s, max_phase_s)
                marks.append((profile, start, time.time()))
            for sid in cfg.silo_ids:  # warm stop: finish the step, DISCONNECT, write the results
                fed.roles[sid].proc.send_signal(signal.SIGTERM)
            _apply(hosts, cfg.silo_ids, phases[0], relay)  # the last steps and goodbyes at full speed
            supervise(fed, cfg, registry)
        finally:
            fed.stop()
            trunk = registry.info("trunk", cfg.worker_ids[0])
            registry.expire_run(RUN_TTL_S)
    ends = {}
    for sid in cfg.silo_ids:
        doc = json.loads((run_dir / "results" / f"{sid}.json").read_text())
        ends[sid] = [h["t"] for h in doc["steps"] if not h.get("skipped")]
    busy = [r["busy"] for r in json.loads(trunk.get("timeline") or "[]")[warmup_steps:]]
    return {"phases": [{"profile": p.name, **phase_throughput(ends, a, b, cfg.batch_size)} for p, a, b in marks],
            "trunk_busy_per_step_s": round(statistics.median(busy), 5) if busy else None,
            "steps_done": {s: len(v) for s, v in ends.items()}}


def run_config(model: str, mode: str, silos: int, batch_size: int, max_length: int) -> DemoConfig:
    """The bench's federation: encrypted, no rounds (aggregation would put barriers inside phases)."""
    return DemoConfig(mode=mode, silos=silos, steps=ENDLESS_STEPS, local_steps=ENDLESS_STEPS, model=model,
                      batch_size=batch_size, max_length=max_length, aggregation="none", hosts="netns")


def echo(text: str) -> None:
    click.echo(f"[bench wan] {text}", err=True)
