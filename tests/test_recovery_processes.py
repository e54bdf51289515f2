"""Crash any role mid-run and nothing is lost or applied twice (`splitfed demo --kill ROLE@STEP`).

Each faulty run must end with exactly the fault-free run's losses, the same (silo, step) schedule
with every step once, and the same final silo and trunk weights: a restart anywhere rolls the
run back to the last committed round, whose checkpoints every role holds, and replays from there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ARGS = ["--model", "tiny", "--silos", "2", "--steps", "20", "--local-steps", "10", "--seed", "3"]


def _demo(tmp: Path, prefix: str, name: str, *extra: str) -> tuple[dict, Path]:
    run_dir, out = tmp / name, tmp / f"{name}.json"
    env = {**os.environ, "SPLITFED_CACHE_DIR": str(tmp / "cache")}
    proc = subprocess.run([sys.executable, "-m", "splitfed", "demo", *ARGS, "--key-prefix", prefix,
                           "--run-dir", str(run_dir), "--json", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), run_dir


def _final_weights(run_dir: Path) -> dict:
    weights = {f.name: load_file(str(f)) for f in (run_dir / "weights").glob("*.safetensors")}
    trunk = sorted((run_dir / "checkpoints" / "trunk0").glob("round-*.safetensors"))[-1]
    weights["trunk"] = {k: v for k, v in load_file(str(trunk)).items() if k.startswith("param/")}
    return weights


KILLS = ["trunk@7", "broker@9", "silo1@5", "redis@11", "broker@uncommitted-hello", "trunk@round-end-unsaved"]
# The module's demos (the fault-free one and one per selected kill) are independent runs, each of its
# own run id, ports, run dir and (redis@) private Redis; most of a demo's wall time is its processes'
# imports, on one core each, so a few run at once, started ahead by the `demos` fixture and each
# awaited by the test that checks it. Every demo is still a whole real run, checked as before.
CONCURRENT_DEMOS = 3


class _Demos:
    def __init__(self, tmp: Path, prefix: str, runs: dict[str, tuple[str, ...]]) -> None:
        self.pool = ThreadPoolExecutor(CONCURRENT_DEMOS, thread_name_prefix="demo")
        self.futures = {name: self.pool.submit(_demo, tmp, prefix, name, *extra) for name, extra in runs.items()}

    def result(self, name: str) -> tuple[dict, Path]:
        return self.futures[name].result()  # a failed demo's assertion is raised here, in its test


@pytest.fixture(scope="module")
def demos(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("recovery")
    prefix = f"splitfed-test-rec-{os.getpid()}"
    selected = [item.callspec.params["kill"] for item in request.session.items
                if item.module is request.module and item.originalname == "test_a_killed_role_changes_nothing"]
    runs = {"fault-free": (), **{kill.replace("@", "-"): ("--kill", kill) for kill in KILLS if kill in selected}}
    started = _Demos(tmp, prefix, runs)
    yield started
    started.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def fault_free(demos):
    result, run_dir = demos.result("fault-free")
    return result, _final_weights(run_dir)


@pytest.mark.parametrize("kill", KILLS)
def test_a_killed_role_changes_nothing(demos, fault_free, kill):
    """broker@uncommitted-hello is the window of issue 14: round 0 aggregated, a silo's round-1
    session already accepted by the trunk, round 0 not committed. The broker stops itself there
    (a fail point), so the kill lands in that window on every run.

    trunk@round-end-unsaved: the trunk dies with round 0 applied but not checkpointed, and comes back
    only after the broker declared it dead (a supervisor's restart delay). The round closes for the
    silos without it, so it must not commit: committing it left no trunk to restore, and the run
    went on from the restarted trunk's initial weights (loss off by 0.59 before the fix)."""
    base, base_weights = fault_free
    result, run_dir = demos.result(kill.replace("@", "-"))
    (fault,) = result["faults"]
    assert fault["killed_step"] is not None, "the fault was never injected"
    assert result["servers_stopped_by_signal"] == []  # broker and trunk (--burst) exited 0 by themselves
    broker_log = (run_dir / "logs" / "broker.log").read_text()
    if fault.get("point") == "uncommitted-hello":
        assert "fail point uncommitted-hello reached" in broker_log
        assert "every peer resumes from round -1" in broker_log  # round 0 was indeed not committed
    if fault.get("point") == "round-end-unsaved":
        assert "fail point round-end-unsaved reached" in (run_dir / "logs" / "trunk0.log").read_text()
        assert "trunk worker trunk0 is dead" in broker_log  # declared dead before it came back...
        assert "round 0 not committed: no trunk worker checkpointed it" in broker_log  # ...and no commit
        assert "ROLLBACK to the end of round -1" in broker_log
    assert result["schedule"] == base["schedule"]
    assert len({tuple(s) for s in result["schedule"]}) == len(result["schedule"]) == 40  # each step once
    assert max(abs(a - b) for a, b in zip(result["losses"], base["losses"])) <= 1e-6
    weights = _final_weights(run_dir)
    assert weights.keys() == base_weights.keys()
    for name, tensors in weights.items():
        for key, value in tensors.items():
            assert (value - base_weights[name][key]).abs().max().item() <= 1e-6, (name, key)


def test_a_silo_that_never_returns_is_left_behind_and_can_rejoin(tmp_path, redis_prefix):
    """silo1 dies and stays down: after round_timeout_s the rounds close without it; started again
    much later, it rejoins at the next round and both silos finish."""
    from shared.model.models import resolve_model_dir
    from shared.state.registry import Registry
    from splitfed.demo.federation_run import DemoConfig, launch, make_throwaway_keys, write_silo_data
    from splitfed.demo.processes import Federation
    from splitfed.demo.runner import free_ports
    from tests.conftest import REDIS_URL

    os.environ["SPLITFED_CACHE_DIR"] = str(tmp_path / "cache")
    resolve_model_dir("tiny")
    cfg = DemoConfig(silos=2, steps=60, local_steps=3, model="tiny", batch_size=2, max_length=32,
                     extra_env={"SPLITFED_ROUND_TIMEOUT_S": "6", "SPLITFED_LIVENESS_TTL_S": "3"})
    registry = Registry(REDIS_URL, redis_prefix, "awaysilo")
    registry.create_run({"mode": cfg.mode, "silos": ",".join(cfg.silo_ids)})
    fed = Federation(tmp_path / "logs", {"SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_RUN_ID": "awaysilo",
                                         "SPLITFED_KEY_PREFIX": redis_prefix,
                                         "SPLITFED_CACHE_DIR": str(tmp_path / "cache"), **cfg.model_env()})
    try:
        launch(fed, cfg, tuple(free_ports(2)), write_silo_data(tmp_path, cfg), tmp_path,
               make_throwaway_keys(tmp_path, cfg, registry))
        deadline = time.monotonic() + 300

        def wait_for(cond, what):
            while not cond():
                failed = {n for n in fed.failed() if n != "silo1"}  # silo1 is killed on purpose
                assert time.monotonic() < deadline and not failed, (what, {n: fed.tail(n) for n in fed.roles})
                time.sleep(0.2)

        wait_for(lambda: int(registry.info("silo", "silo1").get("step", -1)) >= 1, "silo1 trains")
        fed.kill("silo1")
        committed = registry.committed_round()
        # Without silo1, rounds still close (after the timeout) and get committed.
        wait_for(lambda: registry.committed_round() >= committed + 2, "rounds close without silo1")
        assert "silent" in fed.tail("broker", 200)
        fed.restart("silo1")
        wait_for(lambda: all(s in fed.exited() for s in cfg.silo_ids), "both silos finish")
        assert {s: fed.exited()[s] for s in cfg.silo_ids} == {"silo0": 0, "silo1": 0}, fed.tail("silo1", 60)
        assert "rejoin" in fed.tail("broker", 400)
        assert int(registry.round_state().get("rollbacks", 0)) == 0  # a silo that was left behind rolls nobody back
    finally:
        fed.stop()
        os.environ.pop("SPLITFED_CACHE_DIR", None)
