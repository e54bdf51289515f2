"""`splitfed experiment bbc` end to end on the tiny model: real processes, both arms, every output.

The numbers of a tiny random model mean nothing; this checks the plumbing: the federation ran and
saved every adapter, the centralized arm ran the same budget, all models were evaluated on the
same held-out articles, and the JSON, Markdown and PNG were written. The real result (SmolLM2)
is in README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REDIS_URL

pytestmark = pytest.mark.slow


def test_experiment_bbc_runs_both_arms_and_writes_the_report(redis_prefix, tmp_path):
    out = tmp_path / "bbc"
    env = {**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "splitfed", "experiment", "bbc", "--model", "tiny", "--silos", "2", "--steps", "2",
         "--train-per-topic", "4", "--eval-per-topic", "2", "--partition", "label-skew", "--alpha", "1.0",
         "--out", str(out), "--key-prefix", redis_prefix],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert [name for name, _ in result["table"]] == ["zero-shot (base)", "centralized", "split-fed (mean of silos)",
                                                     "split-fed silo0", "split-fed silo1"]
    assert len(result["split_losses"]) == len(result["centralized_losses"]) == 2 * 2  # the same budget
    assert result["data"]["heldout"] == 10 and result["data"]["train"] == 20
    assert sum(sum(c.values()) for c in result["data"]["silo_label_counts"]) == 20
    for name, metrics in result["metrics"].items():
        assert metrics["examples"] == 10 and 0 <= metrics["accuracy"] <= 100, name
        assert len(result["predictions"][name]) == 10
    for f in ("silo0.safetensors", "silo1.safetensors", "trunk.safetensors"):
        assert (out / "federation" / "weights" / f).is_file()
    assert (out / "centralized" / "adapter.safetensors").is_file()
    assert set(result["verdict"]["disagreements"]) == {"split-fed silo0", "split-fed silo1"}
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| centralized |" in report and "label-skew" in report
    assert "| split-fed (mean of silos) |" in proc.stdout


def test_experiment_refuses_a_bad_preset_override(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "splitfed", "experiment", "bbc", "--model", "tiny",
                           "--eval-per-topic", "100000", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SPLITFED_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 1 and "cannot hold out 100000" in proc.stderr
