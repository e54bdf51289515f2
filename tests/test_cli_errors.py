"""Wrong configuration gives a clear message and a distinct exit code, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REDIS_URL


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitfed", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, **(env or {})})


def test_invalid_setting_is_a_usage_error():
    proc = run_cli("silo", "--run-id", "not a valid id!")
    assert proc.returncode == 2
    assert "run_id" in proc.stderr and "Traceback" not in proc.stderr


def test_invalid_setting_from_environment_is_reported_too():
    proc = run_cli("broker", env={"SPLITFED_MODE": "sideways"})
    assert proc.returncode == 2 and "mode" in proc.stderr


def test_missing_data_file_is_a_config_error(redis_prefix, tmp_path):
    proc = run_cli("silo", "--model", "tiny", "--data", str(tmp_path / "missing.jsonl"),
                   env={"SPLITFED_CACHE_DIR": str(tmp_path / "cache")})  # a silo has no Redis options
    assert proc.returncode == 4, proc.stderr
    assert "missing.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_redis_is_reported(tmp_path):
    proc = run_cli("broker", "--silos", "silo0", env={"SPLITFED_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert proc.returncode == 3 and "does not answer" in proc.stderr
