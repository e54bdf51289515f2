"""`splitfed bench modes`' hierarchical memory runs, on the tiny model: real demos (processes,
sockets, Redis), one row per (silos, steps per silo), and the ratios the README quotes."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_memory_runs_compare_many_silos_with_one_silo_at_equal_steps(tmp_path, redis_prefix, monkeypatch):
    from splitfed.bench.modes import STEPS_PER_SILO, hierarchical_memory

    monkeypatch.setenv("SPLITFED_KEY_PREFIX", redis_prefix)
    monkeypatch.setenv("SPLITFED_CACHE_DIR", str(tmp_path / "cache"))
    out = hierarchical_memory("tiny", [1, 2], tmp_path, inflight=(1,), concurrent=3)
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


def test_bench_memory_measures_each_role_in_its_own_process(tmp_path, monkeypatch):
    """`splitfed bench memory` on the tiny model: a row per role, the silo holding exactly the
    embedding, its head and tail blocks, the final norm and the (tied) LM head, the trunk only its
    middle blocks; peaks above the post-import baseline."""
    from splitfed.bench.memory import measure

    monkeypatch.setenv("SPLITFED_CACHE_DIR", str(tmp_path / "cache"))
    out = measure(["tiny"], ["bf16"], head_layers=2, tail_layers=1, batch=2, seq=16)
    rows = {r["role"]: r for r in out["rows"]}
    assert set(rows) == {"silo", "trunk"}
    silo, trunk = rows["silo"], rows["trunk"]
    assert silo["holds"] == {"blocks": [0, 1, 3], "modules": ["lm_head", "model.embed_tokens", "model.norm"]}
    assert trunk["holds"] == {"blocks": [2], "modules": []}
    # every frozen weight of the model is on exactly one side (the tied head counted once)
    assert silo["params"] + trunk["params"] == silo["model_params_total"]
    for row in rows.values():
        assert row["peak_rss_mb"] >= row["loaded_rss_mb"] > row["baseline_rss_mb"] > 50
        assert row["trainable_params"] > 0 and row["dtype"] == "bf16"
