"""The demo stops the whole federation, leaving no process behind, when a role dies or on Ctrl+C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from shared.state.registry import Registry
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.slow

ROLES = [("broker", "broker"), ("trunk", "trunk0"), ("silo", "silo0"), ("silo", "silo1")]


def _start_demo(prefix: str, tmp_path) -> subprocess.Popen:
    env = {**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.Popen(
        [sys.executable, "-m", "splitfed", "demo", "--model", "tiny", "--silos", "2", "--steps", "100000",
         "--key-prefix", prefix, "--run-dir", str(tmp_path / "run")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for_training(prefix: str, demo: subprocess.Popen) -> tuple[Registry, dict[str, int]]:
    """Wait until both silos have trained a step; return the run's registry and its role pids."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert demo.poll() is None, demo.communicate()[0]
        runs = Registry(REDIS_URL, prefix, "x").redis.smembers(f"{prefix}:runs")
        if runs:
            registry = Registry(REDIS_URL, prefix, next(iter(runs)))
            infos = {m: registry.info(r, m) for r, m in ROLES}
            if all("pid" in i for i in infos.values()) and all("loss" in infos[s] for s in ("silo0", "silo1")):
                return registry, {m: int(i["pid"]) for m, i in infos.items()}
        time.sleep(0.3)
    raise AssertionError("the demo did not start training")


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie not yet reaped by its parent is dead too
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] == "Z"


def _assert_all_gone(pids: dict[str, int]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(_dead(p) for p in pids.values()):
        time.sleep(0.2)
    assert all(_dead(p) for p in pids.values()), {m: p for m, p in pids.items() if not _dead(p)}


def test_a_crashed_role_stops_the_demo_with_its_log(redis_prefix, tmp_path):
    demo = _start_demo(redis_prefix, tmp_path)
    try:
        registry, pids = _wait_for_training(redis_prefix, demo)
        os.kill(pids["trunk0"], signal.SIGKILL)
        out, _ = demo.communicate(timeout=60)
    finally:
        demo.kill()
    assert demo.returncode == 1
    assert "trunk0 exited with code -9" in out
    assert registry.run_meta()["status"] == "failed"
    _assert_all_gone(pids)


def test_ctrl_c_stops_every_role(redis_prefix, tmp_path):
    demo = _start_demo(redis_prefix, tmp_path)
    try:
        registry, pids = _wait_for_training(redis_prefix, demo)
        demo.send_signal(signal.SIGINT)
        out, _ = demo.communicate(timeout=120)  # a hang guard: under CPU load the roles take longer to stop
    finally:
        demo.kill()
    assert demo.returncode == 130, out
    assert registry.run_meta()["status"] == "interrupted"
    _assert_all_gone(pids)
