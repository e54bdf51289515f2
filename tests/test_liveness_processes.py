"""Liveness both ways over ZeroMQ, and a broker that Redis cannot stall (issue 14, item 4).

* The broker heartbeats every registered silo: a silo whose broker dies says so within a few
  heartbeats, and gives up after ``broker_timeout_s`` (not after its 300 s step timeout).
* The broker writes to Redis from a background thread (counters coalesced): with Redis paused
  (``CLIENT PAUSE``) and 10,000 garbage frames arriving, an honest silo's steps go on.

Real processes, real ZeroMQ TCP on loopback, a real (private) redis-server.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import time

import pytest
import redis
import zmq

from shared.model.models import resolve_model_dir
from shared.wire.protocol import Kind
from shared.state.registry import Registry
from shared.wire.wire import Message, message_to_wire
from splitfed.demo.faults import latest_step
from splitfed.demo.federation_run import DemoConfig, launch, make_throwaway_keys, write_silo_data
from splitfed.demo.processes import Federation
from splitfed.demo.redis_server import PrivateRedis, redis_binary
from splitfed.demo.runner import free_ports
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.slow

HEARTBEAT_S = 0.25


def _wait(cond, what: str, timeout_s: float, fed: Federation | None = None) -> float:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            tails = {n: fed.tail(n) for n in fed.roles} if fed else {}
            raise AssertionError(f"timed out waiting for {what}: {tails}")
        time.sleep(0.02)
    return time.monotonic()


def _log_has(fed: Federation, role: str, text: str) -> bool:
    return text in fed.roles[role].log_path.read_text(errors="replace")


def test_a_silo_notices_a_dead_broker_within_a_few_heartbeats(tmp_path, redis_prefix):
    os.environ["SPLITFED_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        resolve_model_dir("tiny")
        front = f"tcp://127.0.0.1:{free_ports(1)[0]}"
        env = {"SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_KEY_PREFIX": redis_prefix, "SPLITFED_RUN_ID": "deadbroker",
               "SPLITFED_CACHE_DIR": str(tmp_path / "cache"), "SPLITFED_MODEL": "tiny", "SPLITFED_ENCRYPTION": "false",
               "SPLITFED_HEARTBEAT_S": str(HEARTBEAT_S)}
        cfg = DemoConfig(silos=1, model="tiny")
        (data,) = write_silo_data(tmp_path, cfg)
        fed = Federation(tmp_path / "logs", env)
        try:
            # No trunk worker: the silo's first FORWARD waits at the broker, which heartbeats it.
            fed.start("broker", ["broker", "--frontend-bind", front, "--backend-bind", f"tcp://127.0.0.1:{free_ports(1)[0]}",
                                 "--silos", "silo0"])
            fed.start("silo0", ["silo", "--broker-frontend", front, "--silo-id", "silo0", "--data", str(data),
                                "--steps", "5", "--batch-size", "1", "--max-length", "16",
                                "--broker-timeout-s", "4", "--step-timeout-s", "300"])
            _wait(lambda: _log_has(fed, "silo0", "registered with the broker"), "the silo to register", 120, fed)
            time.sleep(4 * HEARTBEAT_S)  # it waits for a trunk; the broker's heartbeats keep it calm
            assert not _log_has(fed, "silo0", "silent")
            fed.kill("broker")
            killed = time.monotonic()
            noticed = _wait(lambda: _log_has(fed, "silo0", "has been silent"), "the silo to notice", 30, fed)
            # 3 silent heartbeats; allow for log polling and a loaded CI machine, far below 300 s
            assert noticed - killed < 12 * HEARTBEAT_S, fed.tail("silo0")
            gave_up = _wait(lambda: "silo0" in fed.exited(), "the silo to give up", 30, fed)
            assert fed.exited()["silo0"] == 5  # exit code PEER
            assert _log_has(fed, "silo0", "giving up")
            assert gave_up - killed < 4 + 30 * HEARTBEAT_S  # broker_timeout_s, not step_timeout_s
        finally:
            fed.stop()
    finally:
        os.environ.pop("SPLITFED_CACHE_DIR", None)


def test_garbage_flood_with_redis_paused_does_not_stall_an_honest_silo(tmp_path):
    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis-server binary for a private Redis that this test may pause")
    private = PrivateRedis(binary)
    os.environ["SPLITFED_CACHE_DIR"] = str(tmp_path / "cache")
    prefix, run_id = f"splitfed-test-{secrets.token_hex(4)}", "flood"
    try:
        resolve_model_dir("tiny")
        steps = 400
        cfg = DemoConfig(silos=1, steps=steps, local_steps=steps, model="tiny", batch_size=1, max_length=16,
                         extra_env={"SPLITFED_HEARTBEAT_S": "1.0"})
        registry = Registry(private.url, prefix, run_id)
        registry.create_run({"mode": cfg.mode, "silos": "silo0"})
        fed = Federation(tmp_path / "logs", {"SPLITFED_REDIS_URL": private.url, "SPLITFED_RUN_ID": run_id,
                                             "SPLITFED_KEY_PREFIX": prefix, "SPLITFED_CACHE_DIR": str(tmp_path / "cache"),
                                             **cfg.model_env()})
        ports = tuple(free_ports(2))
        try:
            launch(fed, cfg, ports, write_silo_data(tmp_path, cfg), tmp_path, make_throwaway_keys(tmp_path, cfg, registry))
            log_path = fed.roles["silo0"].log_path
            _wait(lambda: latest_step(log_path) >= 20, "the silo to train", 180, fed)
            assert not fed.failed()

            ctx = zmq.Context.instance()
            garbage = ctx.socket(zmq.DEALER)
            garbage.setsockopt(zmq.LINGER, 0)
            garbage.setsockopt(zmq.SNDHWM, 0)
            garbage.connect(f"tcp://127.0.0.1:{ports[0]}")
            unknown = message_to_wire(Message(Kind.HEARTBEAT, run_id, "intruder"))
            pause_s = 8.0
            redis.Redis.from_url(private.url).execute_command("CLIENT", "PAUSE", int(pause_s * 1000), "ALL")
            flood_at = time.time()
            for i in range(10_000):  # malformed frames and well-formed ones for an unknown silo
                garbage.send_multipart([secrets.token_bytes(40)] if i % 2 else unknown, copy=False)
            step_at_flood = latest_step(log_path)
            time.sleep(pause_s)
            garbage.close()
            _wait(lambda: "silo0" in fed.exited(), "the silo to finish", 300, fed)
            assert fed.exited()["silo0"] == 0, fed.tail("silo0")
        finally:
            fed.stop()
        times = [h["t"] for h in json.loads((tmp_path / "results" / "silo0.json").read_text())["steps"]]
        gaps = [b - a for a, b in zip(times, times[1:])]
        before = [g for a, g in zip(times, gaps) if a < flood_at]
        during = [g for a, g in zip(times, gaps) if flood_at <= a < flood_at + pause_s]
        assert len(during) >= 5, f"only {len(during)} steps while Redis was paused (from step {step_at_flood})"
        # Inline Redis writes would hold the broker for the whole pause (8 s); a few heartbeats is the bound.
        assert max(during) < statistics.median(before) + 3 * 1.0, (max(during), statistics.median(before))
        rejected = Registry(private.url, prefix, run_id).rejected()
        assert sum(rejected.values()) >= 10_000  # every garbage frame counted once Redis was back (coalesced)
    finally:
        os.environ.pop("SPLITFED_CACHE_DIR", None)
        private.stop()
