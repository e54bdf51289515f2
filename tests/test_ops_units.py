"""The systemd units, env files and Redis config under ops/, checked three ways:

* parsed: every ExecStart runs a real `splitfed` subcommand with real options, EnvironmentFile
  paths, restart and warm-stop settings, hardening; every variable of the example env files is a
  setting of that role and the files load into valid settings;
* `systemd-analyze verify` (a throw-away --root holding the units and a stand-in executable), where
  systemd is installed: no warning allowed;
* run: broker, trunk worker and silo started with exactly the units' ExecStart command lines (the
  binary path swapped for this venv's) and environments built like systemd builds them (the unit's
  Environment=, then its env files; the example files plus test overrides) against real Redis,
  while `splitfed status --json` shows the live run; then SIGTERM stops every role warmly.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
INSTALL_BIN = "/opt/splitfed/.venv/bin/splitfed"
UNITS = {"broker": "splitfed-broker.service", "trunk": "splitfed-trunk@.service", "silo": "splitfed-silo@.service"}
INSTANCE = {"broker": None, "trunk": "trunk0", "silo": "silo0"}
HARDENING = {
    "User": "splitfed", "Group": "splitfed", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
    "ProtectHome": "yes", "PrivateTmp": "yes", "StateDirectory": "splitfed", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes", "LockPersonality": "yes", "CapabilityBoundingSet": "",
    "SystemCallArchitectures": "native",
}
# Read straight from the environment by shared/model/models.py and shared/model/model_store.py, not a settings field.
EXTRA_VARS = {"SPLITFED_CACHE_DIR"}


# ------------------------------------------------------------------------------------ parsing helpers
def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """systemd unit syntax: [Section], Key=Value (keys may repeat), # and ; comments, \\ continuation."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current, pending = None, ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            assert current not in sections, f"{path.name}: section [{current}] twice"
            sections[current] = []
            continue
        assert current is not None and "=" in line, f"{path.name}: unexpected line {raw!r}"
        key, value = line.split("=", 1)
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}: expected one value, got {found}"
    return found[0]


def parse_env_file(path: Path) -> dict[str, str]:
    """systemd EnvironmentFile syntax as these files use it: KEY=value, # comments, optional quotes."""
    env = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("export "), f"{path.name}:{n}: systemd does not understand `export`"
        key, sep, value = line.partition("=")
        assert sep and key == key.strip() and key.isidentifier(), f"{path.name}:{n}: not KEY=value: {raw!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def commented_vars(path: Path) -> list[str]:
    """Variables shown as commented-out defaults (`#SPLITFED_X=...`)."""
    return [line[1:].split("=", 1)[0] for line in path.read_text().splitlines()
            if line.startswith("#SPLITFED_") and "=" in line]


def exec_argv(role: str, binary: str | None = None) -> list[str]:
    """The unit's ExecStart as argv, with the instance specifier resolved (and the binary swapped)."""
    unit = parse_unit(OPS / UNITS[role])
    argv = shlex.split(one(unit, "Service", "ExecStart").replace("%i", INSTANCE[role] or ""))
    if binary:
        assert argv[0] == INSTALL_BIN
        argv[0] = binary
    return argv


def unit_environment(role: str) -> dict[str, str]:
    unit = parse_unit(OPS / UNITS[role])
    env = {}
    for line in values(unit, "Service", "Environment"):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = value
    return env


def settings_class(role: str):
    from shared.runtime.settings import BrokerSettings, SiloSettings, TrunkSettings

    return {"broker": BrokerSettings, "trunk": TrunkSettings, "silo": SiloSettings}[role]


# ------------------------------------------------------------------------------------ static checks
@pytest.mark.parametrize("role", list(UNITS))
def test_unit_runs_a_real_subcommand_with_real_options(role):
    import click

    from splitfed.cli import COMMANDS, main

    argv = exec_argv(role)
    assert argv[0] == INSTALL_BIN, "units assume the install path /opt/splitfed/.venv (ops/README.md)"
    assert argv[1] == role and role in COMMANDS
    command = main.get_command(click.Context(main), argv[1])
    known = {opt for p in command.params for opt in p.opts}
    options = [a for a in argv[2:] if a.startswith("--")]
    assert set(options) <= known, f"unknown options {set(options) - known}"
    # the instance name is the member id: passed on the command line so no env file can override it
    if role != "broker":
        assert argv[2:] == [f"--{'worker' if role == 'trunk' else 'silo'}-id", INSTANCE[role]]


@pytest.mark.parametrize("role", list(UNITS))
def test_unit_environment_files_restart_and_warm_stop(role):
    unit = parse_unit(OPS / UNITS[role])
    assert set(unit) == {"Unit", "Service", "Install"}
    files = values(unit, "Service", "EnvironmentFile")
    assert files[0] == f"/etc/splitfed/{role}.env", "the role's env file comes first and is required"
    if role != "broker":
        assert files[1:] == [f"-/etc/splitfed/{role}-%i.env"], "per-instance overrides, optional"
    assert (OPS / "env" / f"{role}.env").is_file()
    assert one(unit, "Service", "Restart") == "on-failure"
    assert set(one(unit, "Service", "RestartPreventExitStatus").split()) == {"2", "4"}
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert one(unit, "Service", "KillMode") == "mixed"  # SIGTERM to the main process only
    assert int(one(unit, "Service", "TimeoutStopSec")) >= 120, "a warm stop may wait for a whole step"
    assert one(unit, "Service", "WorkingDirectory") == "/var/lib/splitfed"
    assert unit_environment(role)["HOME"] == "/var/lib/splitfed"  # ProtectHome=yes hides /home
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("role", list(UNITS))
def test_unit_hardening(role):
    unit = parse_unit(OPS / UNITS[role])
    for key, value in HARDENING.items():
        assert one(unit, "Service", key) == value, key
    families = set(one(unit, "Service", "RestrictAddressFamilies").split())
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= families <= {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    assert one(unit, "Service", "SystemCallFilter") == "@system-service"
    # the trunk needs GPU device nodes; the others get a private /dev
    assert one(unit, "Service", "PrivateDevices") == ("no" if role == "trunk" else "yes")
    # breaks cffi callbacks and JIT code in torch/CUDA: must stay off
    assert not values(unit, "Service", "MemoryDenyWriteExecute")


@pytest.mark.parametrize("role", list(UNITS))
def test_example_env_file_is_valid_settings(role, monkeypatch):
    path = OPS / "env" / f"{role}.env"
    env = parse_env_file(path)
    cls = settings_class(role)
    fields = {f"SPLITFED_{name.upper()}" for name in cls.model_fields}
    for name in [*env, *commented_vars(path)]:
        assert name.startswith("SPLITFED_") and (name in fields or name in EXTRA_VARS), f"{path.name}: {name}"
    # a silo reaches only the broker: its file names no Redis
    needed = ("SPLITFED_RUN_ID", "SPLITFED_LOG_LEVEL") + (("SPLITFED_REDIS_URL", "SPLITFED_KEY_PREFIX") if role != "silo" else ())
    for name in needed:
        assert name in env, f"{path.name} should set {name}"
    if role != "broker":
        assert env["SPLITFED_CACHE_DIR"].startswith("/var/lib/splitfed/"), "the only writable place"
        assert env["SPLITFED_KEYS_DIR"].startswith("/var/lib/splitfed/")
        assert env["SPLITFED_ENCRYPTION"] == "true"
    for name in list(os.environ):
        if name.startswith("SPLITFED_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = cls()  # raises if a value does not validate
    assert settings.run_id == env["SPLITFED_RUN_ID"]


def test_model_settings_agree_between_trunk_and_silo_examples():
    from shared.runtime.settings import CommonSettings, ModelSettings

    trunk, silo = parse_env_file(OPS / "env" / "trunk.env"), parse_env_file(OPS / "env" / "silo.env")
    shared_by_run = set(ModelSettings.model_fields) - set(CommonSettings.model_fields) | {"encryption", "cipher", "run_id"}
    for name in sorted(shared_by_run):
        var = f"SPLITFED_{name.upper()}"
        assert trunk.get(var) == silo.get(var), f"{var} must be equal on the trunk and every silo"


def test_status_settings_match_common_settings():
    """`splitfed status` keeps its own torch-free settings class: same variables, same defaults."""
    from shared.runtime.settings import CommonSettings
    from splitfed.status_command import StatusSettings

    for name, field in StatusSettings.model_fields.items():
        assert CommonSettings.model_fields[name].default == field.default, name
    assert StatusSettings.model_config["env_prefix"] == CommonSettings.model_config["env_prefix"]


def test_redis_config_persistence_and_localhost():
    conf = {}
    for line in (OPS / "redis" / "splitfed-redis.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            conf.setdefault(key, []).append(value)
    assert conf["appendonly"] == ["yes"] and conf["appendfsync"] == ["everysec"]
    assert conf["save"] and conf["save"][0] not in ('""', "")
    assert conf["bind"][0].split()[0] == "127.0.0.1" and all("0.0.0.0" not in b for b in conf["bind"])
    assert conf["protected-mode"] == ["yes"]
    assert conf["maxmemory-policy"] == ["noeviction"]


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")
def test_redis_config_loads_in_redis_server(tmp_path):
    """The real server accepts the file (port and dir redirected to the test's own)."""
    sock = tmp_path / "r.sock"
    proc = subprocess.Popen(["redis-server", str(OPS / "redis" / "splitfed-redis.conf"), "--port", "0",
                             "--unixsocket", str(sock), "--dir", str(tmp_path), "--logfile", str(tmp_path / "log")])
    try:
        import redis

        client = redis.Redis(unix_socket_path=str(sock), decode_responses=True)
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.05)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        client.set("k", "v")
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (tmp_path / "appendonlydir").is_dir()


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd); the parse checks above ran")
    # A throw-away root: the units, the distribution's own units they depend on, and a stand-in for
    # the install path's executable (verify checks that ExecStart exists).
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in UNITS.values():
        shutil.copy(OPS / name, root / "etc/systemd/system" / name)
    for dist in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(dist).is_dir():
            shutil.copytree(dist, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
            break
    exe = root / INSTALL_BIN.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    instances = ["splitfed-broker.service", "splitfed-trunk@trunk0.service", "splitfed-silo@silo0.service"]
    proc = subprocess.run([tool, "verify", f"--root={root}", "--man=no", *instances],
                          capture_output=True, text=True, timeout=60)
    if "--root" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip("this systemd-analyze has no --root")
    # verify exits 0 even on unknown keys or bad values: any output at all is a finding
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------ the live run
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(splitfed: str, env: dict, run: str) -> dict:
    proc = subprocess.run([splitfed, "status", "--run", run, "--json"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_roles_run_from_unit_command_lines_and_env_files(redis_prefix, tmp_path):
    from shared.crypto import keys as keystore
    from shared.crypto import enrollment
    from shared.state.registry import Registry
    from tests.conftest import REDIS_URL

    splitfed = str(Path(sys.executable).parent / "splitfed")
    run = "ops1"
    state = tmp_path / "state"  # stands for /var/lib/splitfed
    state.mkdir()
    registry = Registry(REDIS_URL, redis_prefix, run)
    registry.create_run({"mode": "serial", "silos": "silo0", "local_steps": 3, "model": "tiny"})
    trunk_keys = keystore.generate_trunk_keys(state / "keys" / "trunk")
    silo_keys = keystore.generate_silo_keys(state / "keys" / "silo")
    enrollment.enroll(registry, "silo0", silo_keys.identity_public, silo_keys.x25519_public)
    data = state / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Note {i}:", "completion": f" class {i % 3}"}) + "\n"
                            for i in range(32)))
    front, back = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    common = {"SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_KEY_PREFIX": redis_prefix, "SPLITFED_RUN_ID": run,
              "SPLITFED_CACHE_DIR": str(tmp_path / "cache"), "SPLITFED_MODEL": "tiny"}
    overrides = {
        "broker": {"SPLITFED_FRONTEND_BIND": front, "SPLITFED_BACKEND_BIND": back, "SPLITFED_SILOS": "silo0"},
        "trunk": {"SPLITFED_BROKER_BACKEND": back, "SPLITFED_DEVICE": "cpu",
                  "SPLITFED_KEYS_DIR": str(state / "keys" / "trunk"),
                  "SPLITFED_CHECKPOINT_DIR": str(state / "checkpoints")},
        "silo": {"SPLITFED_BROKER_FRONTEND": front, "SPLITFED_KEYS_DIR": str(state / "keys" / "silo"),
                 "SPLITFED_TRUNK_FINGERPRINT": trunk_keys.fingerprint, "SPLITFED_DATA": str(data),
                 "SPLITFED_STEPS": "100000", "SPLITFED_BATCH_SIZE": "2", "SPLITFED_MAX_LENGTH": "32",
                 "SPLITFED_RESULTS": str(state / "results" / "silo0.json"),
                 "SPLITFED_SAVE_DIR": str(state / "results" / "weights"), "SPLITFED_STEP_TIMEOUT_S": "60",
                 "SPLITFED_CHECKPOINT_DIR": str(state / "checkpoints")},
    }
    procs: dict[str, subprocess.Popen] = {}
    try:
        for role in ("broker", "trunk", "silo"):
            # like systemd: a clean environment, the unit's Environment=, then its env file
            env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", **unit_environment(role)}
            env["HOME"] = str(state)
            env.update(parse_env_file(OPS / "env" / f"{role}.env"))
            env.update(common)
            env.update(overrides[role])
            with open(tmp_path / f"{role}.log", "wb") as log:
                procs[role] = subprocess.Popen(exec_argv(role, splitfed), env=env, cwd=state, stdout=log,
                                               stderr=subprocess.STDOUT)

        def logs() -> str:
            return "\n".join(f"--- {r}\n" + (tmp_path / f"{r}.log").read_text()[-3000:] for r in procs)

        status_env = {"PATH": os.environ["PATH"], "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_KEY_PREFIX": redis_prefix}
        deadline = time.monotonic() + 90
        first = None
        while True:
            assert time.monotonic() < deadline, "the run did not advance\n" + logs()
            assert all(p.poll() is None for p in procs.values()), "a role exited early\n" + logs()
            snap = _status(splitfed, status_env, run)
            silo = snap["silos"][0]
            if silo["step"] is not None:
                if first is None:
                    first = snap
                elif silo["step"] > first["silos"][0]["step"]:
                    break
            time.sleep(0.2)

        # the live run as an operator sees it
        assert snap["meta"]["mode"] == "serial" and snap["broker"]["alive"]
        assert silo["id"] == "silo0" and silo["status"] == "joined" and silo["alive"]
        assert silo["heartbeat_age_s"] < 5 and silo["loss"] > 0 and silo["steps"] == 100000
        [trunk] = snap["trunks"]
        assert trunk["id"] == "trunk0" and trunk["alive"] and trunk["status"] == "joined" and trunk["device"] == "cpu"
        assert snap["rejected"] == {}
        table = subprocess.run([splitfed, "status", "--run", run], env=status_env, capture_output=True, text=True,
                               timeout=30).stdout
        assert "silo0" in table and "trunk0" in table and "broker alive" in table
        listing = subprocess.run([splitfed, "status", "--json"], env=status_env, capture_output=True, text=True,
                                 timeout=30)
        assert [r["run_id"] for r in json.loads(listing.stdout)] == [run]

        # warm stop: SIGTERM as systemd sends it (silo first: it finishes its step and leaves)
        for role in ("silo", "trunk", "broker"):
            procs[role].send_signal(signal.SIGTERM)
            assert procs[role].wait(timeout=60) == 0, f"{role} did not stop cleanly\n" + logs()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    final = _status(splitfed, status_env, run)
    assert final["silos"][0]["status"] == "finished" and not final["silos"][0]["alive"]
    assert final["trunks"][0]["status"] == "stopped" and final["trunks"][0]["updates"] >= 2
    assert final["broker"]["status"] == "stopped" and not final["broker"]["alive"]
    results = json.loads((state / "results" / "silo0.json").read_text())
    assert len(results["steps"]) >= 2 and results["encryption"] is True
    assert (state / "results" / "weights" / "silo0.safetensors").is_file()
