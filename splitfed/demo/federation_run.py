"""Run one whole local federation: Redis, broker, trunk worker and N silos as OS processes."""

from __future__ import annotations

import json
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.crypto import certificates, enrollment
from shared.crypto import keys as keystore
from splitfed.experiment.bbc import demo_examples, split_for_silos
from shared.state.registry import Registry

RUN_TTL_S = 24 * 3600  # the demo's Redis keys stay inspectable for a day, then expire


@dataclass
class DemoConfig:
    mode: str = "serial"
    silos: int = 2
    steps: int = 20
    local_steps: int = 10
    model: str = "smollm2"
    seed: int = 0
    batch_size: int = 4
    max_length: int = 128
    adapter: str = "lora"
    lr: float = 1e-3
    wire_dtype: str = "fp32"
    micro_batches: str = "1"  # per silo: N or "auto" (silo_agent/microbatch.py)
    dtype: str = "fp32"
    head_layers: int = 1
    tail_layers: int = 1
    step_timeout_s: float = 300.0
    encryption: bool = True
    curve: bool = False
    aggregation: str = "fedavg"
    personalize: bool = False
    workers: int = 1
    batch_window_ms: int = 10000
    max_inflight: int = 2
    recompute_forward: bool = False
    trunk_quant: str = "none"
    cut_clip_norm: float | None = None
    cut_noise_sigma: float = 0.0
    privacy_strength: float = 0.0  # the learned privacy adapter's lambda: silos only (SPLITFED_PRIVACY_STRENGTH)
    kills: tuple[str, ...] = ()
    role_env: tuple[str, ...] = ()  # "ROLE:SPLITFED_NAME=VALUE": one role's own extra environment
    hosts: str = "local"  # "netns": the server side and each silo on a host (network namespace) of its own
    extra_env: dict[str, str] = field(default_factory=dict)

    def model_env(self) -> dict[str, str]:
        """Settings every role of the run must agree on, as SPLITFED_* variables."""
        return {
            "SPLITFED_MODEL": self.model, "SPLITFED_SEED": str(self.seed), "SPLITFED_ADAPTER": self.adapter,
            "SPLITFED_LR": repr(self.lr), "SPLITFED_WIRE_DTYPE": self.wire_dtype,
            "SPLITFED_DTYPE": self.dtype,
            "SPLITFED_HEAD_LAYERS": str(self.head_layers), "SPLITFED_TAIL_LAYERS": str(self.tail_layers),
            "SPLITFED_ENCRYPTION": str(self.encryption).lower(),  # broker: signed registration
            **self.extra_env,
        }

    def run_config(self) -> dict:
        """The run's reference config (shared/state/run_config.py): the settings every role gets from
        model_env() (over this environment, as the roles see it), and the mode."""
        from shared.state.run_config import RUN_CONFIG_FIELDS, run_config
        from shared.runtime.settings import TrunkSettings  # the class with every run-wide field

        env = self.model_env()
        given = {f: env[f"SPLITFED_{f.upper()}"] for f in RUN_CONFIG_FIELDS if f"SPLITFED_{f.upper()}" in env}
        return run_config(TrunkSettings(**{**given, "mode": self.mode}))

    def role_envs(self) -> dict[str, dict[str, str]]:
        """--role-env, by role (broker, trunk: every worker, or a silo id). Raises ValueError."""
        envs: dict[str, dict[str, str]] = {}
        for item in self.role_env:
            role, _, assignment = item.partition(":")
            name, eq, value = assignment.partition("=")
            if role not in ("broker", "trunk", *self.silo_ids) or not eq or not name.startswith("SPLITFED_"):
                raise ValueError(f"--role-env {item!r}: expected ROLE:SPLITFED_NAME=VALUE with ROLE one of "
                                 f"broker, trunk, {', '.join(self.silo_ids)}")
            envs.setdefault(role, {})[name] = value
        return envs

    @property
    def silo_ids(self) -> list[str]:
        return [f"silo{i}" for i in range(self.silos)]

    @property
    def worker_ids(self) -> list[str]:
        return [f"trunk{i}" for i in range(self.workers)]


def new_run_id() -> str:
    return f"demo-{secrets.token_hex(4)}"


def write_silo_data(run_dir: Path, cfg: DemoConfig) -> list[Path]:
    """Split the shipped BBC demo set over the silos (IID), one JSONL file per silo."""
    parts = split_for_silos(demo_examples(), cfg.silos, cfg.seed)
    paths = []
    for i, examples in enumerate(parts):
        path = run_dir / "data" / f"silo{i}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(e) + "\n" for e in examples))
        paths.append(path)
    return paths


def make_throwaway_keys(run_dir: Path, cfg: DemoConfig, registry: Registry) -> dict[str, dict[str, str]]:
    """Fresh keys for this run only: an operator key, a trunk service key, and one key set per silo,
    enrolled with an operator-signed certificate.

    Returns each role's extra environment (its key directory; the pinned trunk and operator fingerprints).
    """
    if not cfg.encryption:
        return {}
    operator = certificates.generate_operator_key(run_dir / "keys" / "operator")
    enrollment.publish_operator_key(registry, certificates.operator_public(operator))
    pinned = {"SPLITFED_OPERATOR_FINGERPRINT": keystore.fingerprint(certificates.operator_public(operator))}
    trunk = keystore.generate_trunk_keys(run_dir / "keys" / "trunk")
    env = {"trunk": {"SPLITFED_KEYS_DIR": str(run_dir / "keys" / "trunk"), **pinned}, "broker": dict(pinned)}
    for sid in cfg.silo_ids:
        silo = keystore.generate_silo_keys(run_dir / "keys" / sid)
        certificate = certificates.issue(operator, registry.run_id, sid, silo.identity_public, silo.x25519_public, 0)
        enrollment.enroll(registry, sid, silo.identity_public, silo.x25519_public, certificate=certificate)
        env[sid] = {"SPLITFED_KEYS_DIR": str(run_dir / "keys" / sid), "SPLITFED_TRUNK_FINGERPRINT": trunk.fingerprint,
                    **pinned}
    return env


def make_curve_certificates(run_dir: Path, cfg: DemoConfig) -> dict[str, dict[str, str]]:
    """CurveZMQ certificates for every role; the broker admits exactly the trunk and the silos."""
    if not cfg.curve:
        return {}
    from splitfed.keys_command import make_curve_certificate

    root, allow = run_dir / "curve", run_dir / "curve" / "allow"
    allow.mkdir(parents=True, exist_ok=True)
    broker_public, broker_secret = make_curve_certificate(root, "broker")
    env = {"broker": {"SPLITFED_CURVE": "true", "SPLITFED_CURVE_CERT": str(broker_secret),
                      "SPLITFED_CURVE_ALLOW_DIR": str(allow)}}
    for name in ["trunk", *cfg.silo_ids]:
        public, secret = make_curve_certificate(root, name)
        (allow / public.name).write_bytes(public.read_bytes())
        env[name] = {"SPLITFED_CURVE": "true", "SPLITFED_CURVE_CERT": str(secret),
                     "SPLITFED_CURVE_BROKER_KEY": str(broker_public)}
    return env


def launch(fed, cfg: DemoConfig, ports: tuple[int, int], data: list[Path], run_dir: Path,
           keys_env: dict[str, dict[str, str]], hosts=None) -> None:
    """``hosts``: a NetnsHosts (splitfed/demo/netns.py) to run each role on its own host, or None."""
    front = launch_servers(fed, cfg, ports, keys_env, run_dir, hosts)
    for i, sid in enumerate(cfg.silo_ids):
        if hosts is not None:  # the broker as this silo's host reaches it: over its own link
            front = f"tcp://{hosts.server_address_for(sid)}:{ports[0]}"
        fed.start(sid, ["silo", "--broker-frontend", front, "--silo-id", sid, "--silo-index", str(i),
                        "--data", str(data[i]), "--steps", str(cfg.steps), "--local-steps", str(cfg.local_steps),
                        "--batch-size", str(cfg.batch_size), "--max-length", str(cfg.max_length),
                        "--step-timeout-s", str(cfg.step_timeout_s), "--checkpoint-dir", str(run_dir / "checkpoints"),
                        "--results", str(run_dir / "results" / f"{sid}.json"),
                        "--save-dir", str(run_dir / "weights"), "--cut-noise-sigma", repr(cfg.cut_noise_sigma),
                        *(["--cut-clip-norm", repr(cfg.cut_clip_norm)] if cfg.cut_clip_norm else [])],
                  env={**_privacy_env(cfg), "SPLITFED_MICRO_BATCHES": cfg.micro_batches, **(keys_env.get(sid) or {})},
                  prefix=tuple(hosts.prefix(sid)) if hosts is not None else ())


def _privacy_env(cfg: DemoConfig) -> dict[str, str]:
    """The learned defense is the silo's own business: the trunk and the broker never get it."""
    return {"SPLITFED_PRIVACY_STRENGTH": repr(cfg.privacy_strength)} if cfg.privacy_strength else {}


def launch_servers(fed, cfg: DemoConfig, ports: tuple[int, int], keys_env: dict[str, dict[str, str]],
                   run_dir: Path, hosts=None) -> str:
    """The broker and the trunk workers; returns the address silos connect to."""
    front, back = (f"tcp://127.0.0.1:{p}" for p in ports)
    server = tuple(hosts.prefix("server")) if hosts is not None else ()
    bind = f"tcp://0.0.0.0:{ports[0]}" if hosts is not None else front  # every silo link of the server host
    fed.start("broker", ["broker", "--frontend-bind", bind, "--backend-bind", back, "--mode", cfg.mode,
                         "--silos", ",".join(cfg.silo_ids), "--batch-window-ms", str(cfg.batch_window_ms),
                         "--aggregation", cfg.aggregation, "--max-inflight", str(cfg.max_inflight),
                         "--personalize", str(cfg.personalize).lower(), "--burst", "true"], env=keys_env.get("broker"),
              prefix=server)
    for wid in cfg.worker_ids:
        fed.start(wid, ["trunk", "--broker-backend", back, "--worker-id", wid, "--mode", cfg.mode,
                        "--checkpoint-dir", str(run_dir / "checkpoints"), "--save-dir", str(run_dir / "weights"),
                        "--recompute-forward", str(cfg.recompute_forward).lower(), "--trunk-quant", cfg.trunk_quant,
                        "--burst", "true"],
                  env={**keys_env.get("trunk", {}), **keys_env.get(wid, {})}, prefix=server)  # every worker's, its own
    return front


class Progress:
    """One status line from Redis every half second: rewritten in place on a terminal."""

    def __init__(self, registry: Registry, cfg: DemoConfig) -> None:
        self.registry, self.cfg = registry, cfg
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last_line = ""
        self._last_state = ""
        self._last_print = 0.0

    def update(self) -> None:
        parts = []
        for sid in self.cfg.silo_ids:
            info = self.registry.info("silo", sid)
            if "step" not in info:  # still importing / loading its model: say so
                parts.append(f"{sid} {'waiting for its turn' if info.get('status') == 'joined' else 'starting'}")
                continue
            parts.append(f"{sid} {int(info['step']) + 1}/{self.cfg.steps} loss {float(info['loss']):.3f}")
        rnd = self.registry.round_state().get("round", "0")
        state = f"round {rnd} | " + " | ".join(parts)
        line = f"[{time.monotonic() - self.started:6.1f}s] {state}"
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r" + line.ljust(len(self._last_line)))
            sys.stderr.flush()
            self._last_line = line
        elif state != self._last_state and now - self._last_print > 2.0:
            # in a log file: a line only when something moved, at most every 2 s
            print(line, file=sys.stderr, flush=True)
            self._last_print, self._last_state = now, state

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def collect_losses(run_dir: Path, cfg: DemoConfig) -> tuple[list[dict], float, float]:
    """All silos' steps in the order the trunk applied them (its update counter), the training
    time (the longest silo's, from registration to its last step: no start-up), and the seconds
    all silos spent sealing and opening frames."""
    rows, train_s, crypto_s = [], 0.0, 0.0
    for sid in cfg.silo_ids:
        doc = json.loads((run_dir / "results" / f"{sid}.json").read_text())
        train_s = max(train_s, doc["wall_s"])
        crypto_s += doc.get("crypto_s", 0.0)
        for h in doc["steps"]:
            if not h.get("skipped"):  # a straggler's step (client-batch) applied nothing
                rows.append({"silo": sid, "silo_index": doc["silo_index"], **h})
    rows.sort(key=lambda r: (r["trunk_seq"], r["silo_index"]))
    return rows, train_s, crypto_s

