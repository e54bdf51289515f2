"""Fuzz: >= 10,000 random and mutated frames at a live broker and trunk worker while an honest silo trains.

The attacker is an enrolled but malicious silo (the insider threat: its registration is genuine, so
its frames pass the broker and reach the trunk worker). It sends hypothesis-generated frames: random garbage, and well-formed
messages of every kind with random fields, flags and payloads, then mutated (bit flips, truncation,
extra or missing frames). Required: no role crashes, the trunk applies no step but the honest
silo's (its update counter is exactly 1..N), and the honest silo's losses equal the reference.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.crypto import keys as keystore

from shared.crypto import enrollment
from splitfed.reference.centralized import centralized_reference
from shared.model.models import resolve_model_dir
from shared.wire.protocol import Kind
from shared.crypto.registration import sign_registration
from shared.state.registry import Registry
from shared.wire.wire import FLAG_SEALED, Message, message_from_wire, message_to_wire
from tests.conftest import REDIS_URL
from tests.test_processes import _free_port, _start

pytestmark = pytest.mark.slow

RUN = "fuzz"
N_FRAMES = 10_000
HONEST_STEPS = 6

KINDS = [k for k in Kind if k != Kind.DISCONNECT]  # the attacker stays in the rotation to reach the trunk


@st.composite
def well_formed(draw) -> list[bytes]:
    kind = draw(st.sampled_from(KINDS))
    b, t, h = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.sampled_from([8, 64]))
    if kind == Kind.FORWARD:
        tensors = [torch.randn(b, t, h), torch.ones(b, t, dtype=torch.uint8), torch.arange(t, dtype=torch.int32).expand(b, t)]
    elif kind in (Kind.FORWARD_RESULT, Kind.BACKWARD):
        tensors = [torch.randn(b, t, h)]
    elif kind == Kind.BACKWARD_RESULT:
        tensors = [torch.randn(b, t, h), torch.tensor([draw(st.integers(0, 100))])]
    elif kind in (Kind.HELLO, Kind.HELLO_ACK):
        raw = draw(st.binary(min_size=1, max_size=256))
        tensors = [torch.frombuffer(bytearray(raw), dtype=torch.uint8)]
    else:
        tensors = []
    silo = draw(st.sampled_from(["silo1", "silo1", "silo1", "silo0", "nobody"]))
    msg = Message(kind, draw(st.sampled_from([RUN, RUN, "otherrun"])), silo, draw(st.integers(0, 3)),
                  draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**64 - 1)), [x.contiguous() for x in tensors])
    sealed = draw(st.booleans())
    frames = [bytes(f) for f in message_to_wire(msg, flags=FLAG_SEALED if sealed else 0)]
    if sealed:  # a sealed payload carries a 16-byte tag: make the lengths plausible
        frames = [frames[0], *[f + draw(st.binary(min_size=16, max_size=16)) for f in frames[1:]]]
    return frames


@st.composite
def mutated(draw) -> list[bytes]:
    frames = draw(well_formed())
    how = draw(st.sampled_from(["flip", "truncate", "extend", "drop", "add", "none"]))
    i = draw(st.integers(0, len(frames) - 1))
    f = bytearray(frames[i])
    if how == "flip" and f:
        pos = draw(st.integers(0, len(f) - 1))
        f[pos] ^= 1 << draw(st.integers(0, 7))
    elif how == "truncate":
        f = f[: draw(st.integers(0, len(f)))]
    elif how == "extend":
        f += draw(st.binary(min_size=1, max_size=32))
    frames[i] = bytes(f)
    if how == "drop" and len(frames) > 1:
        del frames[i]
    elif how == "add":
        frames.append(draw(st.binary(max_size=64)))
    return frames


garbage = st.lists(st.binary(max_size=300), min_size=1, max_size=6)
any_frames = st.one_of(garbage, well_formed(), mutated(), mutated())


def test_fuzzing_a_live_federation(redis_prefix, tmp_path):
    os.environ.setdefault("SPLITFED_CACHE_DIR", str(tmp_path / "cache"))
    tiny = resolve_model_dir("tiny")
    registry = Registry(REDIS_URL, redis_prefix, RUN)
    registry.create_run({"mode": "serial", "silos": "silo0,silo1", "local_steps": 3})
    trunk_keys = keystore.generate_trunk_keys(tmp_path / "trunk-keys")
    silo_keys = keystore.generate_silo_keys(tmp_path / "silo-keys")
    enrollment.enroll(registry, "silo0", silo_keys.identity_public, silo_keys.x25519_public)
    evil_keys = keystore.new_silo_keys()
    enrollment.enroll(registry, "silo1", evil_keys.identity_public, evil_keys.x25519_public)
    front, back = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_KEY_PREFIX": redis_prefix, "SPLITFED_RUN_ID": RUN,
           "SPLITFED_MODEL": "tiny"}
    data = tmp_path / "silo0.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Account {i}:", "completion": f" class {i % 3}"}) + "\n" for i in range(12)))
    broker = _start(["broker", "--frontend-bind", front, "--backend-bind", back], env, tmp_path / "broker.log")
    trunk = _start(["trunk", "--broker-backend", back, "--keys-dir", str(tmp_path / "trunk-keys")], env, tmp_path / "trunk.log")
    attacker = zmq.Context.instance().socket(zmq.DEALER)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.setsockopt(zmq.SNDHWM, 100_000)
    attacker.connect(front)
    silo = None
    try:
        deadline = time.monotonic() + 120
        while not (registry.alive("trunk", "trunk0") and registry.alive("broker", "broker")):
            assert time.monotonic() < deadline and broker.poll() is None and trunk.poll() is None
            time.sleep(0.2)
        token = torch.frombuffer(bytearray(sign_registration(evil_keys, RUN, "silo1")), dtype=torch.uint8)
        attacker.send_multipart(message_to_wire(Message(Kind.READY, RUN, "silo1", tensors=[token])))
        reply = attacker.poll(10000) and message_from_wire(attacker.recv_multipart())
        assert reply and reply.kind == Kind.READY, reply
        results = tmp_path / "silo0.json"
        silo = _start(["silo", "--broker-frontend", front, "--silo-id", "silo0", "--data", str(data),
                       "--steps", str(HONEST_STEPS), "--local-steps", "3", "--batch-size", "2", "--max-length", "32",
                       "--keys-dir", str(tmp_path / "silo-keys"), "--trunk-fingerprint", trunk_keys.fingerprint,
                       "--results", str(results)], env, tmp_path / "silo0.log")

        sent = 0

        def drain() -> None:
            while attacker.poll(0):
                attacker.recv_multipart()

        @settings(max_examples=N_FRAMES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(any_frames)
        def send(frames: list[bytes]) -> None:
            nonlocal sent
            attacker.send_multipart(frames)
            sent += 1
            if sent % 50 == 0:
                # keep the attacker's turn moving so the honest silo is never stuck behind it
                h = torch.randn(1, 2, 64)
                attacker.send_multipart(message_to_wire(Message(Kind.FORWARD, RUN, "silo1", 0, sent, tensors=[
                    h, torch.ones(1, 2, dtype=torch.uint8), torch.arange(2, dtype=torch.int32)[None]])))
                drain()

        send()
        assert sent >= N_FRAMES
        assert broker.poll() is None and trunk.poll() is None, "a role crashed under fuzzing"
        attacker.send_multipart(message_to_wire(Message(Kind.DISCONNECT, RUN, "silo1")))
        assert silo.wait(timeout=300) == 0, (tmp_path / "silo0.log").read_text()[-3000:]
        assert broker.poll() is None and trunk.poll() is None

        steps = json.loads(results.read_text())["steps"]
        # the trunk applied the honest silo's steps and nothing else
        assert [s["trunk_seq"] for s in steps] == list(range(1, HONEST_STEPS + 1))

        class Run:
            seed, adapter, lr, head_layers, tail_layers, batch_size, max_length, steps = 0, "lora", 1e-3, 1, 1, 2, 32, HONEST_STEPS

        reference = [r["loss"] for r in centralized_reference(tiny, Run, [data])]
        assert max(abs(s["loss"] - r) for s, r in zip(steps, reference)) <= 1e-5

        rejected = registry.rejected()
        assert sum(rejected.values()) >= N_FRAMES // 2, rejected
        for reason in ("no_session", "unknown_silo", "identity_mismatch", "wrong_run", "bad_registration", "bad_hello"):
            assert rejected.get(reason, 0) > 0, rejected
    finally:
        attacker.close()
        for p in (silo, trunk, broker):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=10)
