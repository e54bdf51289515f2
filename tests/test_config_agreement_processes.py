"""Roles whose settings differ from the run's are refused at every door, with the fields named, and
exit with the configuration exit code (4) in seconds, not after the 300 s step timeout; the
broker and the trunk stay up (real processes, sockets and Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import zmq

from shared.crypto import keys as keystore

from shared.crypto import enrollment
from shared.crypto.handshake import make_hello
from shared.model.models import resolve_model_dir
from shared.wire.protocol import Kind
from shared.crypto.registration import sign_registration
from shared.state.registry import Registry
from shared.state.run_config import claim_line, config_digest, meta_fields, run_config
from shared.runtime.settings import SiloSettings, TrunkSettings
from shared.wire.wire import Message, message_from_wire, message_to_wire
from tests.conftest import REDIS_URL
from tests.test_processes import _free_port, _start

pytestmark = pytest.mark.slow

RUN = "agree"
STEP_TIMEOUT_S = 300  # the silo's default: what a mismatch used to cost at best


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    os.environ["SPLITFED_CACHE_DIR"] = str(cache)
    resolve_model_dir("tiny")
    return cache


def test_a_demo_with_one_silo_on_other_head_layers_fails_fast_naming_the_field(redis_prefix, cache, tmp_path):
    env = {**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_CACHE_DIR": str(cache)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "splitfed", "demo", "--model", "tiny", "--silos", "2", "--steps", "4",
                           "--local-steps", "2", "--key-prefix", redis_prefix, "--run-dir", str(tmp_path / "run"),
                           "--role-env", "silo1:SPLITFED_HEAD_LAYERS=2"],
                          env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "silo1 exited with code 4" in proc.stderr, proc.stderr[-3000:]
    assert "config mismatch with the run: head_layers: run=1, this silo=2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert took < STEP_TIMEOUT_S / 3, f"took {took:.0f}s"


def test_each_door_refuses_a_silo_whose_config_differs_and_the_servers_stay_up(redis_prefix, cache, tmp_path):
    registry = Registry(REDIS_URL, redis_prefix, RUN)
    reference = run_config(TrunkSettings(model="tiny"))
    registry.create_run({"mode": "serial", "silos": "silo0", "local_steps": 2, **meta_fields(reference)})
    trunk_keys = keystore.generate_trunk_keys(tmp_path / "trunk-keys")
    silo_keys = keystore.generate_silo_keys(tmp_path / "silo-keys")
    enrollment.enroll(registry, "silo0", silo_keys.identity_public, silo_keys.x25519_public)
    front, back = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_KEY_PREFIX": redis_prefix, "SPLITFED_RUN_ID": RUN,
           "SPLITFED_CACHE_DIR": str(cache), "SPLITFED_MODEL": "tiny"}
    servers = [_start(["broker", "--frontend-bind", front, "--backend-bind", back], env, tmp_path / "broker.log"),
               _start(["trunk", "--broker-backend", back, "--keys-dir", str(tmp_path / "trunk-keys")], env,
                      tmp_path / "trunk.log")]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"silo0")  # connected after the whole silo of step 1 (one id, one connection)

    def send(kind: Kind, tensor: bytes, text: str, rnd: int = 0) -> Message:
        t = torch.frombuffer(bytearray(tensor), dtype=torch.uint8)
        sock.send_multipart(message_to_wire(Message(kind, RUN, "silo0", rnd, tensors=[t], text=text)))
        while True:  # the broker also heartbeats every registered peer: those are not replies
            assert sock.poll(30000), "no reply"
            reply = message_from_wire(sock.recv_multipart())
            if reply.kind != Kind.HEARTBEAT:
                return reply

    try:
        deadline = time.monotonic() + 120
        while not (registry.alive("trunk", "trunk0") and registry.alive("broker", "broker")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in servers), "a role died at start"
            time.sleep(0.2)

        # 1. a whole silo: the broker refuses its READY against the run's reference (a silo reaches no Redis)
        data = tmp_path / "silo0.jsonl"
        data.write_text('{"text": "a few words"}\n' * 4)
        started = time.monotonic()
        silo = subprocess.run([sys.executable, "-m", "splitfed", "silo", "--broker-frontend", front, "--silo-id", "silo0",
                               "--head-layers", "2", "--keys-dir", str(tmp_path / "silo-keys"), "--data", str(data),
                               "--trunk-fingerprint", trunk_keys.fingerprint], env=env, capture_output=True, text=True,
                              timeout=120)
        assert silo.returncode == 4, silo.stderr
        assert "config mismatch with the run: head_layers: run=1, this silo=2" in silo.stderr
        assert time.monotonic() - started < 60

        # 2. READY: the broker compares the claimed fields with the run's
        sock.connect(front)
        good, wrong = run_config(SiloSettings(model="tiny")), run_config(SiloSettings(model="tiny", head_layers=2))
        reply = send(Kind.READY, sign_registration(silo_keys, RUN, "silo0"), f"incarnation=1\n{claim_line(wrong)}")
        assert (reply.kind, reply.text) == (Kind.ERROR, "config_mismatch: head_layers: run=1, this silo=2")
        reply = send(Kind.READY, sign_registration(silo_keys, RUN, "silo0"), f"incarnation=1\n{claim_line(good)}")
        assert reply.kind == Kind.READY, reply.text

        # 3. HELLO: the trunk checks the fields itself, and the signature covers the silo's digest
        hello, _ = make_hello(silo_keys, "silo0", RUN, 0, config_digest=config_digest(wrong))
        reply = send(Kind.HELLO, hello, claim_line(wrong))
        assert (reply.kind, reply.text) == (Kind.ERROR, "config_mismatch: head_layers: trunk=1, silo=2")
        reply = send(Kind.HELLO, hello, claim_line(good))  # the claim rewritten on the way to look right
        assert reply.kind == Kind.ERROR and reply.text.startswith("bad_hello_signature"), reply.text
        hello, _ = make_hello(silo_keys, "silo0", RUN, 0, config_digest=config_digest(good))
        assert send(Kind.HELLO, hello, claim_line(good)).kind == Kind.HELLO_ACK

        assert all(p.poll() is None for p in servers), "broker or trunk died"
    finally:
        sock.close()
        for p in servers:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)


def test_a_role_the_broker_refuses_at_ready_exits_with_the_config_code(redis_prefix, cache, tmp_path):
    """The run's metadata holds no config yet, so each role's own start-up check passes; the broker
    (in this process) runs in client-batch mode without encryption, and refuses both at READY."""
    import threading

    from broker.broker import Broker
    from shared.runtime.settings import BrokerSettings

    registry = Registry(REDIS_URL, redis_prefix, RUN)
    registry.create_run({"silos": "silo0"})
    front, back = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    broker = Broker(BrokerSettings(redis_url=REDIS_URL, key_prefix=redis_prefix, run_id=RUN, frontend_bind=front,
                                   backend_bind=back, mode="client-batch", encryption=False), registry, ["silo0"], None)
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    trunk_keys = keystore.generate_trunk_keys(tmp_path / "trunk-keys")
    keystore.generate_silo_keys(tmp_path / "silo-keys")
    env = {**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_KEY_PREFIX": redis_prefix, "SPLITFED_RUN_ID": RUN,
           "SPLITFED_CACHE_DIR": str(cache), "SPLITFED_MODEL": "tiny"}
    data = tmp_path / "silo0.jsonl"
    data.write_text('{"text": "a few words"}\n' * 4)
    try:
        trunk = subprocess.run([sys.executable, "-m", "splitfed", "trunk", "--broker-backend", back, "--encryption", "false"],
                               env=env, capture_output=True, text=True, timeout=120)
        assert trunk.returncode == 4, trunk.stderr[-3000:]
        assert 'config_mismatch: mode: run="client-batch", this trunk worker="serial"' in trunk.stderr
        registry.redis.hdel(registry.key("meta"), "config", "config_digest")  # what the trunk recorded
        silo = subprocess.run([sys.executable, "-m", "splitfed", "silo", "--broker-frontend", front, "--data", str(data),
                               "--keys-dir", str(tmp_path / "silo-keys"), "--trunk-fingerprint", trunk_keys.fingerprint],
                              env=env, capture_output=True, text=True, timeout=120)
        assert silo.returncode == 4, silo.stderr[-3000:]
        assert "config mismatch with the run: encryption: run=false, this silo=true" in silo.stderr
        assert thread.is_alive()
    finally:
        broker.stop()
        thread.join(timeout=10)
