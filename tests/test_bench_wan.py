"""`splitfed bench wan`: the per-phase arithmetic, and one tiny run in network namespaces.

The run's numbers are a benchmark's (never asserted); the test checks that the harness does what
it says: the phases ran in their order with steps in each, a ratio per profile, netem's absence
stated, the qdiscs and namespaces gone afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from splitfed.bench.wan_profiles import LOOPBACK, PROFILES, phase_plan, phase_throughput, ratios
from splitfed.demo.netns import NetnsHosts, NetnsUnavailable


def test_every_profile_sits_between_two_loopback_phases():
    assert [p.name for p in phase_plan(["lan", "wan"])] == ["loopback", "lan", "loopback", "wan", "loopback"]
    assert PROFILES["wan"].as_dict()["added_rtt_ms"] == 100.0


def test_only_steps_inside_a_phase_count_and_silos_add_up():
    ends = {"silo0": [0.5, 1.0, 2.0, 3.0, 9.0], "silo1": [1.5, 2.5, 3.5]}
    got = phase_throughput(ends, 1.0, 4.0, batch_size=2)
    # silo0: ends 1, 2, 3 -> intervals 1, 1; silo1: 1.5, 2.5, 3.5 -> 1, 1; 2 samples a second each
    assert got["samples_per_s"] == pytest.approx(4.0) and got["step_intervals"] == 4
    assert phase_throughput({"silo0": [1.0]}, 0.0, 5.0, 2)["samples_per_s"] == 0.0  # one end: no interval
    stalled = phase_throughput({"silo0": [0.0, 1.0, 2.0, 10.0]}, 0.0, 10.0, 1)  # one step stalled by another job
    assert stalled["samples_per_s"] == pytest.approx(1.0) and stalled["samples_per_s_mean"] == pytest.approx(0.3)


def test_a_profile_is_compared_with_the_loopback_phases_next_to_it():
    phases = [{"profile": "loopback", "samples_per_s": 10.0}, {"profile": "lan", "samples_per_s": 9.0},
              {"profile": "loopback", "samples_per_s": 8.0}, {"profile": "wan", "samples_per_s": 4.0},
              {"profile": "loopback", "samples_per_s": 8.0}]
    got = ratios(phases)
    assert got["lan"] == pytest.approx(1.0) and got["wan"] == pytest.approx(0.5)
    assert got["loopback_drift"] == pytest.approx(0.25)


def test_the_round_trips_each_schedule_leaves_exposed():
    from splitfed.bench.wan_report import exposed_round_trips

    assert exposed_round_trips("serial", 1, 1) == 2  # turnaround and step boundary
    assert exposed_round_trips("serial", 1, 4) == 1  # micro-batches cover the turnaround only
    assert exposed_round_trips("serial", 4, 1) == 1  # the next silo's FORWARD already waits at the broker
    assert exposed_round_trips("serial", 4, 4) == 0
    assert exposed_round_trips("client-batch", 4, 1) == 2
    assert exposed_round_trips("client-batch", 4, 4) == 1  # pieces cover the turnaround, not the boundary


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _can_shape() -> str | None:
    try:
        with NetnsHosts(["probe"]) as hosts:
            hosts.shape("probe", 100.0)
    except (NetnsUnavailable, OSError) as exc:
        return str(exc)
    return None


def test_the_probe_sees_the_profile_delay_through_the_relay(tmp_path):
    why = _can_shape()
    if why is not None:
        pytest.skip(f"network namespaces with tbf cannot be made here: {why}")
    from splitfed.bench.wan_probe import probe_links
    from splitfed.demo.runner import free_ports

    before = _namespaces()
    rows = probe_links([LOOPBACK, PROFILES["metro"]], tmp_path, tuple(free_ports(2)))
    assert [r["path"] for r in rows] == ["direct", "relay at 0 ms", "metro"]
    assert rows[2]["rtt_ms_min"] >= 2 * PROFILES["metro"].delay_ms  # a lower bound: the relay held each way
    assert all(r["bulk_mbit_per_s_each_way"] > 0 for r in rows)
    assert _namespaces() == before


def test_a_tiny_bench_wan_run_in_namespaces(tmp_path, redis_prefix):
    why = _can_shape()
    if why is not None:
        pytest.skip(f"network namespaces with tbf cannot be made here: {why}")
    before = _namespaces()
    out = tmp_path / "wan.json"
    proc = subprocess.run([sys.executable, "-m", "splitfed", "bench", "wan", "--model", "tiny", "--modes", "serial",
                           "--silos", "1", "--profiles", "metro", "--micro-batches", "0", "--no-relay-check",
                           "--warmup-steps", "2", "--steps-per-phase", "2", "--min-phase-s", "0",
                           "--key-prefix", redis_prefix, "--out", str(out)],
                          env={k: v for k, v in os.environ.items() if k != "SPLITFED_REDIS_URL"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["netem_available"] is False and "tbf" in doc["emulation"] and "relay" in doc["emulation"]
    (run,) = doc["runs"]
    assert [p["profile"] for p in run["phases"]] == ["loopback", "metro", "loopback"]
    assert all(p["step_intervals"] >= 1 for p in run["phases"])
    assert run["vs_loopback"]["metro"] is not None
    assert "| metro (20 ms RTT, 1 Gbit/s) |" in out.with_suffix(".md").read_text()
    assert _namespaces() == before, "the bench left namespaces behind"
