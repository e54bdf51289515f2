"""Prometheus metrics and JSON logs of a live role (real process, real sockets, real Redis)."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest
import zmq

from shared.runtime.metrics import RoleMetrics
from shared.state.registry import Registry
from tests.conftest import REDIS_URL
from tests.test_processes import _free_port, _start


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_role_metrics_are_served():
    m = RoleMetrics("silo", "s0", port=0)
    m.step(0.2)
    m.sent([b"abcd", memoryview(b"ef")])
    m.rejected("bad_tag")
    m.queue_depth(3)
    text = _scrape(m.port)
    assert 'splitfed_steps_total{id="s0",role="silo"} 1.0' in text
    assert 'splitfed_bytes_sent_total{id="s0",role="silo"} 6.0' in text
    assert 'splitfed_rejected_frames_total{id="s0",reason="bad_tag",role="silo"} 1.0' in text
    assert 'splitfed_queue_depth{id="s0",role="silo"} 3.0' in text
    assert "splitfed_step_seconds_bucket" in text


@pytest.mark.slow
def test_live_broker_metrics_and_json_logs(redis_prefix, tmp_path):
    registry = Registry(REDIS_URL, redis_prefix, "obs")
    registry.create_run({"mode": "serial", "silos": "silo0"})
    front, metrics_port = f"tcp://127.0.0.1:{_free_port()}", _free_port()
    env = {**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_KEY_PREFIX": redis_prefix, "SPLITFED_RUN_ID": "obs"}
    log_path = tmp_path / "broker.log"
    broker = _start(["broker", "--frontend-bind", front, "--backend-bind", f"tcp://127.0.0.1:{_free_port()}",
                     "--metrics-port", str(metrics_port), "--log-json", "true"], env, log_path)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(front)
    try:
        deadline = time.monotonic() + 60
        while not registry.alive("broker", "broker"):
            assert time.monotonic() < deadline and broker.poll() is None, log_path.read_text()
            time.sleep(0.2)
        sock.send_multipart([b"SPFD" + b"\0" * 10])  # truncated header
        deadline = time.monotonic() + 10
        while 'reason="truncated"' not in (text := _scrape(metrics_port)):
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert 'splitfed_rejected_frames_total{id="broker",reason="truncated",role="broker"} 1.0' in text
        assert 'splitfed_bytes_received_total{id="broker",role="broker"} 14.0' in text
    finally:
        sock.close()
        broker.terminate()
        broker.wait(timeout=10)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert lines and all(doc["role"] == "broker" and "ts" in doc and "level" in doc for doc in lines)
    assert any("truncated" in doc["msg"] for doc in lines)
