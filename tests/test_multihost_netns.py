"""Across hosts: the server side and each silo in network namespaces made by the test (ip netns, veth).

Each silo's namespace has one link, to the server's; Redis listens on the server's loopback and
operator link only. The demo's computation runs there unchanged (losses and weights equal the
centralized reference, as on loopback), and a silo cannot reach Redis from its namespace.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import redis

from splitfed.demo.netns import NetnsHosts, NetnsUnavailable
from splitfed.demo.redis_server import redis_binary


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module", autouse=True)
def namespaces_can_be_made():
    try:
        with NetnsHosts(["probe"]):
            pass
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces cannot be made here: {exc}")


def test_the_demo_across_namespaces_trains_exactly_as_on_loopback(tmp_path, redis_prefix):
    before = _namespaces()
    proc = subprocess.run([sys.executable, "-m", "splitfed", "demo", "--model", "tiny", "--silos", "2", "--steps", "4",
                           "--local-steps", "2", "--hosts", "netns", "--check-centralized", "--key-prefix", redis_prefix,
                           "--run-dir", str(tmp_path / "run"), "--json", str(tmp_path / "demo.json")],
                          env={k: v for k, v in os.environ.items() if k != "SPLITFED_REDIS_URL"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "demo.json").read_text())
    assert len(result["losses"]) == 8
    assert result["max_abs_loss_diff"] <= 1e-5 and result["max_abs_weight_diff"] <= 1e-5
    assert _namespaces() == before, "the demo left namespaces behind"


def _connect_from(ns: str, host: str, port: int) -> int:
    """errno of a TCP connect from inside ``ns`` (0: connected)."""
    code = f"import socket\ns = socket.socket()\ns.settimeout(5)\nprint(s.connect_ex(({host!r}, {port})))"
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return int(out.stdout.strip())


def test_a_silo_cannot_reach_redis_from_its_namespace(tmp_path):
    with NetnsHosts(["silo0"]) as hosts:
        url = hosts.start_redis(redis_binary() or "redis-server", tmp_path)
        assert redis.Redis.from_url(url).ping()  # the operator's link reaches it
        silo_ns = hosts.silo_ns["silo0"]
        # the server's address on the silo's own link: nothing of Redis listens there
        assert _connect_from(silo_ns, hosts.server_address_for("silo0"), 6379) == errno.ECONNREFUSED
        # Redis's own address: no route from a silo's namespace
        assert _connect_from(silo_ns, hosts.operator_link, 6379) in (errno.ENETUNREACH, errno.EHOSTUNREACH)
        assert _connect_from(silo_ns, "127.0.0.1", 6379) == errno.ECONNREFUSED  # its own loopback is its own
    assert hosts.server not in _namespaces()
