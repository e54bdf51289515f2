"""`splitfed bench modes`' hierarchical memory runs, on the tiny model: real demos (processes,
sockets, Redis), one row per (silos, steps per silo), and the ratios the README quotes."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_memory_runs_compare_many_silos_with_one_silo_at_equal_steps(tmp_path, redis_prefix, monkeypatch):
    from splitfed.bench.modes import STEPS_PER_SILO, hierarchical_memory

    monkeypatch.setenv("SPLITFED_KEY_PREFIX", redis_prefix)
    monkeypatch.setenv("SPLITFED_CACHE_DIR", str(tmp_path / "cache"))
    out = hierarchical_memory("tiny", [1, 2], tmp_path, inflight=(1,))
    assert not any(r["recompute_forward"] for r in out["runs"])  # one open step: nothing to recompute
    rows = {(r["silos"], r["steps_per_silo"]): r for r in out["runs"]}
    assert set(rows) == {(1, STEPS_PER_SILO), (2, STEPS_PER_SILO), (1, 2 * STEPS_PER_SILO)}
    assert all(r["trunk_peak_rss_mb"] > 50 for r in rows.values())  # a real worker's resident set
    assert rows[1, STEPS_PER_SILO]["vs_first"] == 1.0
    two = rows[2, STEPS_PER_SILO]
    assert two["trunk_steps"] == rows[1, 2 * STEPS_PER_SILO]["trunk_steps"] == 2 * STEPS_PER_SILO
    assert two["vs_one_silo_same_trunk_steps"] == round(
        two["trunk_peak_rss_mb"] / rows[1, 2 * STEPS_PER_SILO]["trunk_peak_rss_mb"], 3)
    # a second copy of the tiny trunk would show in the estimate, not in the measured peak
    assert out["copy_per_silo_estimate_mb"][2] > out["copy_per_silo_estimate_mb"][1]
