"""`splitfed keys` end to end through the CLI against real Redis."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from tests.conftest import REDIS_URL


def keys_cli(*args, prefix: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitfed", "keys", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_KEY_PREFIX": prefix,
                               "SPLITFED_RUN_ID": "keyrun"})


def test_gen_enroll_list_revoke(redis_prefix, tmp_path):
    out = keys_cli("gen", "--role", "silo", "--out", str(tmp_path / "s0"), prefix=redis_prefix)
    assert out.returncode == 0, out.stderr
    assert "fingerprint: sha256:" in out.stdout
    for name in ("ed25519.key", "x25519.key"):
        mode = stat.S_IMODE(os.stat(tmp_path / "s0" / name).st_mode)
        assert mode == 0o600, oct(mode)
        assert (tmp_path / "s0" / name).read_text() not in out.stdout + out.stderr  # never printed

    again = keys_cli("gen", "--role", "silo", "--out", str(tmp_path / "s0"), prefix=redis_prefix)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr

    trunk = keys_cli("gen", "--role", "trunk", "--out", str(tmp_path / "t"), prefix=redis_prefix)
    fp = keys_cli("fingerprint", str(tmp_path / "t"), prefix=redis_prefix)
    assert fp.stdout.strip() in trunk.stdout

    assert keys_cli("enroll", "--silo-id", "silo0", "--keys-dir", str(tmp_path / "s0"), prefix=redis_prefix).returncode == 0
    listed = keys_cli("list", prefix=redis_prefix)
    assert "silo0" in listed.stdout and "enrolled" in listed.stdout
    assert keys_cli("revoke", "--silo-id", "silo0", prefix=redis_prefix).returncode == 0
    assert "revoked" in keys_cli("list", prefix=redis_prefix).stdout
    missing = keys_cli("revoke", "--silo-id", "nobody", prefix=redis_prefix)
    assert missing.returncode != 0 and "not enrolled" in missing.stderr
