"""Integration: the roles as real OS processes over real ZeroMQ TCP sockets and real Redis.

* the golden test: `splitfed demo` (broker, trunk worker and silos as processes) reproduces the
  centralized single-process training step by step, and ends with its final weights;
* a live broker and trunk worker shrug off malformed, unknown-silo and spoofed frames while an
  honest silo trains to exactly the reference losses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq

from shared.crypto import keys as keystore

from shared.crypto import enrollment
from splitfed.reference.centralized import centralized_reference
from shared.model.models import resolve_model_dir
from shared.wire.protocol import Kind
from shared.state.registry import Registry
from shared.wire.wire import Message, message_from_wire, message_to_wire
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    os.environ["SPLITFED_CACHE_DIR"] = str(cache)
    return resolve_model_dir("tiny")


def role_env(prefix: str, run_id: str, cache: Path) -> dict[str, str]:
    return {**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_KEY_PREFIX": prefix, "SPLITFED_RUN_ID": run_id,
            "SPLITFED_CACHE_DIR": str(cache), "SPLITFED_MODEL": "tiny"}


def test_demo_matches_centralized_training(redis_prefix, tiny_dir, tmp_path):
    _golden(redis_prefix, tiny_dir, tmp_path, "lora")


def test_demo_with_prefix_tuning_matches_centralized_training(redis_prefix, tiny_dir, tmp_path):
    _golden(redis_prefix, tiny_dir, tmp_path, "prefix")


def _golden(redis_prefix, tiny_dir, tmp_path, adapter: str) -> None:
    out = tmp_path / "out.json"
    env = {**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_CACHE_DIR": str(tiny_dir.parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "splitfed", "demo", "--model", "tiny", "--mode", "serial", "--silos", "2",
         "--steps", "6", "--local-steps", "3", "--check-centralized", "--json", str(out),
         "--key-prefix", redis_prefix, "--run-dir", str(tmp_path / "run"), "--adapter", adapter],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert len(result["losses"]) == len(result["centralized_losses"]) == 12
    assert result["max_abs_loss_diff"] <= 1e-5
    # every silo's head/tail and the trunk adapter after the last step and the last round's FedAvg
    assert result["max_abs_weight_diff"] <= 1e-5 and result["weight_tensors_compared"] > 0
    # serial: silos take turns one step each, and every (silo, step) is applied exactly once
    assert result["schedule"] == [[f"silo{i}", s] for s in range(6) for i in range(2)]
    registry = Registry(REDIS_URL, redis_prefix, result["run_id"])
    rounds = registry.round_state()
    assert (rounds["committed"], rounds["state"]) == ("1", "finished")  # 6 steps / K=3 -> rounds 0 and 1
    assert registry.run_meta()["status"] == "finished"
    assert registry.rejected() == {}
    # every role stopped and left
    for role, member in [("broker", "broker"), ("trunk", "trunk0"), ("silo", "silo0"), ("silo", "silo1")]:
        assert not registry.alive(role, member)
    assert "MATCH" in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "splitfed", *args], env=env, stdout=f, stderr=subprocess.STDOUT)


def _recv(sock: zmq.Socket, timeout_ms: int = 10000) -> Message:
    assert sock.poll(timeout_ms), "no reply"
    return message_from_wire(sock.recv_multipart())


def test_live_roles_survive_bad_frames_and_honest_silo_is_unaffected(redis_prefix, tiny_dir, tmp_path):
    run_id = "badframes"
    registry = Registry(REDIS_URL, redis_prefix, run_id)
    registry.create_run({"mode": "serial", "silos": "silo0", "local_steps": 4})
    front, back = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    env = role_env(redis_prefix, run_id, tiny_dir.parent.parent)
    trunk_keys = keystore.generate_trunk_keys(tmp_path / "trunk-keys")
    silo_keys = keystore.generate_silo_keys(tmp_path / "silo-keys")
    enrollment.enroll(registry, "silo0", silo_keys.identity_public, silo_keys.x25519_public)
    data = tmp_path / "silo0.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Item {i}:", "completion": f" answer {i % 3}"}) + "\n" for i in range(16)))
    procs = [
        _start(["broker", "--frontend-bind", front, "--backend-bind", back], env, tmp_path / "broker.log"),
        _start(["trunk", "--broker-backend", back, "--keys-dir", str(tmp_path / "trunk-keys")], env, tmp_path / "trunk.log"),
    ]
    ctx = zmq.Context.instance()
    evil = ctx.socket(zmq.DEALER)
    evil.setsockopt(zmq.LINGER, 0)
    evil.setsockopt(zmq.IDENTITY, b"mallory")
    evil.connect(front)
    try:
        deadline = time.monotonic() + 120
        while not registry.alive("trunk", "trunk0") or not registry.alive("broker", "broker"):
            assert time.monotonic() < deadline, "roles did not come up"
            assert all(p.poll() is None for p in procs), "a role died at start"
            time.sleep(0.2)

        # 1. garbage of every kind: dropped, counted, nobody crashes
        evil.send_multipart([b"not a frame"])
        evil.send_multipart([b"SPFD" + b"\0" * 10])
        good = [bytes(f) for f in message_to_wire(Message(Kind.READY, run_id, "silo0"))]
        bad_version = bytearray(good[0])
        bad_version[4] = 7
        evil.send_multipart([bytes(bad_version)])
        evil.send_multipart([good[0], b"unexpected extra frame"])

        # 2. a silo that is not a member of the run gets a clear ERROR
        evil.send_multipart(message_to_wire(Message(Kind.READY, run_id, "intruder")))
        reply = _recv(evil)
        assert reply.kind == Kind.ERROR and "unknown_silo" in reply.text

        # 3. a wrong run id is refused
        evil.send_multipart(message_to_wire(Message(Kind.READY, "otherrun", "silo0")))
        reply = _recv(evil)
        assert reply.kind == Kind.ERROR and "wrong_run" in reply.text

        # 4. frames spoofing the honest silo (not registered yet) are refused: say READY first
        h = torch.zeros(1, 4, 64)
        spoof = Message(Kind.FORWARD, run_id, "silo0", tensors=[h, torch.ones(1, 4, dtype=torch.uint8),
                                                                 torch.arange(4, dtype=torch.int32)[None]])
        evil.send_multipart(message_to_wire(spoof))
        reply = _recv(evil)
        assert reply.kind == Kind.ERROR and reply.text.startswith("register")

        # 5. the honest silo trains while all of that happened; its losses equal the reference
        results = tmp_path / "silo0.json"
        silo = _start(["silo", "--broker-frontend", front, "--silo-id", "silo0", "--data", str(data), "--steps", "4",
                       "--local-steps", "4", "--batch-size", "2", "--max-length", "32", "--results", str(results),
                       "--keys-dir", str(tmp_path / "silo-keys"), "--trunk-fingerprint", trunk_keys.fingerprint],
                      env, tmp_path / "silo0.log")
        assert silo.wait(timeout=300) == 0, (tmp_path / "silo0.log").read_text()
        assert all(p.poll() is None for p in procs), "broker or trunk died"

        losses = [h["loss"] for h in json.loads(results.read_text())["steps"]]

        class Run:
            seed, adapter, lr, head_layers, tail_layers, batch_size, max_length, steps = 0, "lora", 1e-3, 1, 1, 2, 32, 4

        ref = [r["loss"] for r in centralized_reference(tiny_dir, Run, [data])]
        assert len(losses) == len(ref) == 4
        assert max(abs(a - b) for a, b in zip(losses, ref)) <= 1e-5

        rejected = registry.rejected()
        for reason in ("truncated", "bad_version", "frame_count", "unknown_silo", "wrong_run", "register"):
            assert rejected.get(reason, 0) >= 1, (reason, rejected)
    finally:
        evil.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "roles did not stop cleanly on SIGTERM"
