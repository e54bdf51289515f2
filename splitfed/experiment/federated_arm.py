"""The split-federated arm: the serial federation as real OS processes, as `splitfed demo` runs it.

Redis (the local one or a private server), a broker, one trunk worker and N silo agents, each a
`python -m splitfed ROLE` process, sealed end to end with throwaway keys. Each silo trains on its
own JSONL; at the end every silo writes its head/tail adapter and the trunk its own adapter
into `weights/` (as every demo does), which the evaluation merges per silo.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from shared.state.registry import Registry
from shared.state.run_config import meta_fields
from splitfed.demo.federation_run import (
    RUN_TTL_S,
    DemoConfig,
    collect_losses,
    launch,
    make_throwaway_keys,
    new_run_id,
)
from splitfed.demo.processes import Federation
from splitfed.demo.redis_server import find_or_start_redis
from splitfed.demo.runner import free_ports, supervise
from splitfed.experiment.presets import Preset


@dataclass
class FederatedRun:
    run_id: str
    rows: list[dict]  # every step, in the order the trunk applied them
    weights_dir: Path
    train_s: float
    wall_s: float

    def silo_file(self, silo: str) -> Path:
        return self.weights_dir / f"{silo}.safetensors"

    @property
    def trunk_file(self) -> Path:
        return self.weights_dir / "trunk.safetensors"


def demo_config(preset: Preset, model: str) -> DemoConfig:
    return DemoConfig(mode="serial", silos=preset.silos, steps=preset.steps, local_steps=preset.local_steps,
                      model=model, seed=preset.seed, batch_size=preset.batch_size, max_length=preset.max_length,
                      adapter="lora", lr=preset.lr, wire_dtype=preset.wire_dtype,
                      extra_env={"SPLITFED_LORA_R": str(preset.lora_r), "SPLITFED_LORA_ALPHA": str(preset.lora_alpha)})


def run_federation(preset: Preset, model: str, silo_paths: list[Path], run_dir: Path, key_prefix: str) -> FederatedRun:
    cfg = demo_config(preset, model)
    started = time.perf_counter()
    url, private_redis = find_or_start_redis()
    run_id = new_run_id()
    registry = Registry(url, key_prefix, run_id)
    registry.create_run({"mode": cfg.mode, "silos": ",".join(cfg.silo_ids), "steps": cfg.steps,
                         "local_steps": cfg.local_steps, "model": model, "adapter": cfg.adapter,
                         "status": "running", "experiment": "bbc", **meta_fields(cfg.run_config())})
    fed = Federation(run_dir / "logs", {"SPLITFED_REDIS_URL": url, "SPLITFED_RUN_ID": run_id,
                                         "SPLITFED_KEY_PREFIX": key_prefix, **cfg.model_env()})
    weights = run_dir / "weights"
    status = "failed"
    try:
        keys_env = make_throwaway_keys(run_dir, cfg, registry)
        launch(fed, cfg, tuple(free_ports(2)), silo_paths, run_dir, keys_env)
        supervise(fed, cfg, registry)
        status = "finished"
    finally:
        fed.stop()  # SIGTERM: the trunk writes its adapter on the way out
        registry.set_run_status(status)
        registry.expire_run(RUN_TTL_S)
        if private_redis is not None:
            private_redis.stop()
    rows, train_s, _ = collect_losses(run_dir, cfg)
    if not (weights / "trunk.safetensors").is_file():
        raise RuntimeError(f"the trunk wrote no adapter; see {run_dir / 'logs' / 'trunk0.log'}")
    return FederatedRun(run_id, rows, weights, train_s, time.perf_counter() - started)
