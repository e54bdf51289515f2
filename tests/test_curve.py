"""CurveZMQ at a live broker: only clients whose certificate is in the ZAP allow-list get through."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from shared.wire.protocol import Kind
from shared.state.registry import Registry
from shared.wire.wire import Message, message_from_wire, message_to_wire
from splitfed.keys_command import make_curve_certificate
from tests.conftest import REDIS_URL
from tests.test_processes import _free_port, _start

pytestmark = pytest.mark.slow


def _client(front: str, cert: Path | None, broker_public: Path | None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if cert is not None:
        sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(str(cert))
        sock.curve_serverkey, _ = zmq.auth.load_certificate(str(broker_public))
    sock.connect(front)
    return sock


def _answers(sock: zmq.Socket, timeout_ms: int) -> bool:
    # A DEALER whose handshake the broker refused has no peer left: a plain send would block forever.
    sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
    try:
        sock.send_multipart(message_to_wire(Message(Kind.READY, "curverun", "stranger")))
    except zmq.Again:
        return False
    if not sock.poll(timeout_ms):
        return False
    return message_from_wire(sock.recv_multipart()).kind == Kind.ERROR  # unknown_silo: it got through


def test_zap_allow_list(redis_prefix, tmp_path):
    certs, allow = tmp_path / "certs", tmp_path / "allow"
    allow.mkdir()
    broker_public, broker_secret = make_curve_certificate(certs, "broker")
    allowed_public, allowed_secret = make_curve_certificate(certs, "allowed")
    _, stranger_secret = make_curve_certificate(certs, "stranger")
    (allow / allowed_public.name).write_bytes(allowed_public.read_bytes())
    assert oct(os.stat(allowed_secret).st_mode & 0o777) == "0o600"

    registry = Registry(REDIS_URL, redis_prefix, "curverun")
    registry.create_run({"mode": "serial", "silos": "silo0"})
    front = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_KEY_PREFIX": redis_prefix,
           "SPLITFED_RUN_ID": "curverun"}
    broker = _start(["broker", "--frontend-bind", front, "--backend-bind", f"tcp://127.0.0.1:{_free_port()}",
                     "--curve", "true", "--curve-cert", str(broker_secret), "--curve-allow-dir", str(allow)],
                    env, tmp_path / "broker.log")
    socks = []
    try:
        deadline = time.monotonic() + 60
        while not registry.alive("broker", "broker"):
            assert time.monotonic() < deadline and broker.poll() is None, (tmp_path / "broker.log").read_text()
            time.sleep(0.2)
        socks = [_client(front, allowed_secret, broker_public), _client(front, stranger_secret, broker_public),
                 _client(front, None, None)]
        assert _answers(socks[0], 10000), "an allowed client must get through"
        assert not _answers(socks[1], 2000), "a certificate outside the allow-list must not"
        assert not _answers(socks[2], 2000), "a client without CurveZMQ must not"
        assert broker.poll() is None
    finally:
        for s in socks:
            s.close()
        broker.terminate()
        broker.wait(timeout=10)
