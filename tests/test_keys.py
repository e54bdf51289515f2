"""Key files (modes, loading errors), fingerprints, and the enrollment allow-list in real Redis."""

from __future__ import annotations

import os
import stat

import pytest

from shared.crypto import enrollment, keys
from shared.crypto.enrollment import enroll, list_enrolled, lookup, publish_trunk_key, revoke, trunk_public_key
from shared.crypto.keys import (
    InsecureKeyFileWarning,
    KeyFileError,
    KeyStoreError,
    display_fingerprint,
    fingerprint,
    fingerprints_equal,
    generate_silo_keys,
    generate_trunk_keys,
    load_silo_keys,
    load_silo_public,
    load_trunk_keys,
    normalize_fingerprint,
)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------- files


def test_generate_and_load_silo_keys(tmp_path, capsys):
    d = tmp_path / "silo"
    made = generate_silo_keys(d)
    assert capsys.readouterr() == ("", "")  # nothing printed, let alone a private key
    assert mode(d) == 0o700
    for name in ("ed25519.key", "x25519.key"):
        assert mode(d / name) == 0o600
        assert (d / name).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert mode(d / "ed25519.pub") == 0o644
    loaded = load_silo_keys(d)
    assert (loaded.identity_public, loaded.x25519_public) == (made.identity_public, made.x25519_public)
    assert load_silo_public(d) == (made.identity_public, made.x25519_public)
    assert not list(d.glob(".*tmp"))  # no temporary files left behind


def test_generate_and_load_trunk_keys(tmp_path):
    made = generate_trunk_keys(tmp_path / "trunk")
    assert mode(tmp_path / "trunk" / "x25519.key") == 0o600
    loaded = load_trunk_keys(tmp_path / "trunk")
    assert loaded.x25519_public == made.x25519_public
    assert loaded.fingerprint == fingerprint(made.x25519_public)


def test_private_files_are_0600_from_creation_even_with_umask_0(tmp_path, monkeypatch):
    seen = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **kw):
        seen.append((str(path), flags, mode))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(keys.os, "open", spy)
    old = os.umask(0)
    try:
        generate_silo_keys(tmp_path / "s")
    finally:
        os.umask(old)
    private = [(f, m) for p, f, m in seen if ".key." in p]
    assert len(private) == 2
    for flags, m in private:
        assert m == 0o600 and flags & os.O_CREAT and flags & os.O_EXCL
    assert mode(tmp_path / "s" / "x25519.key") == 0o600


def test_generate_refuses_to_overwrite(tmp_path):
    first = generate_trunk_keys(tmp_path)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_trunk_keys(tmp_path)
    second = generate_trunk_keys(tmp_path, overwrite=True)
    assert second.x25519_public != first.x25519_public
    assert load_trunk_keys(tmp_path).x25519_public == second.x25519_public
    assert mode(tmp_path / "x25519.key") == 0o600


def test_group_readable_private_key_is_refused(tmp_path):
    generate_silo_keys(tmp_path)
    os.chmod(tmp_path / "ed25519.key", 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_silo_keys(tmp_path)
    with pytest.warns(InsecureKeyFileWarning):
        load_silo_keys(tmp_path, allow_insecure=True)


def test_missing_and_malformed_key_files(tmp_path):
    with pytest.raises(KeyFileError, match="no such key file"):
        load_trunk_keys(tmp_path)
    generate_silo_keys(tmp_path)
    (tmp_path / "x25519.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n")
    os.chmod(tmp_path / "x25519.key", 0o600)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key") as err:
        load_silo_keys(tmp_path)
    assert "not base64" not in str(err.value)  # never echo key file content


def test_wrong_key_type_and_mismatched_pub(tmp_path):
    generate_silo_keys(tmp_path)
    # an X25519 key where the Ed25519 identity should be
    os.replace(tmp_path / "x25519.key", tmp_path / "ed25519.key")
    with pytest.raises(KeyFileError, match="expected Ed25519"):
        load_silo_keys(tmp_path)
    other = tmp_path / "other"
    generate_trunk_keys(other)
    generate_trunk_keys(tmp_path / "t")
    os.replace(other / "x25519.pub", tmp_path / "t" / "x25519.pub")
    with pytest.raises(KeyFileError, match="does not match"):
        load_trunk_keys(tmp_path / "t")


def test_bad_pub_file(tmp_path):
    (tmp_path / "x.pub").write_text("zz" * 32)
    with pytest.raises(KeyFileError, match="hex"):
        keys.load_public(tmp_path / "x.pub")


def test_keys_repr_shows_no_secret(tmp_path):
    k = generate_silo_keys(tmp_path)
    text = repr(k)
    pem = (tmp_path / "ed25519.key").read_text()
    assert "sha256:" in text and pem.splitlines()[1] not in text


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_formats():
    pub = bytes(range(32))
    fp = fingerprint(pub)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    shown = display_fingerprint(fp)
    assert shown.count(" ") == 7
    assert normalize_fingerprint(shown) == fp
    assert normalize_fingerprint(fp.upper().replace("SHA256:", "")) == fp
    assert fingerprints_equal(shown, fp)
    assert not fingerprints_equal(fp, fingerprint(bytes(32)))
    with pytest.raises(ValueError):
        normalize_fingerprint("sha256:1234")
    with pytest.raises(ValueError):
        fingerprint(b"short")


# ---------------------------------------------------------------- Redis allow-list


def test_enroll_lookup_list_revoke(registry):
    s0, s1 = keys.new_silo_keys(), keys.new_silo_keys()
    assert lookup(registry, "silo0") is None
    e = enroll(registry, "silo0", s0.identity_public, s0.x25519_public)
    enroll(registry, "silo1", s1.identity_public, s1.x25519_public)
    got = lookup(registry, "silo0")
    assert got == e and not got.revoked and got.ed25519_public == s0.identity_public
    assert registry.redis.hgetall(registry.key("keys", "silo", "silo0"))["status"] == "enrolled"
    assert [d["silo_id"] for d in list_enrolled(registry)] == ["silo0", "silo1"]

    assert revoke(registry, "silo0") is True
    assert revoke(registry, "nobody") is False
    got = lookup(registry, "silo0")
    assert got.revoked and got.revoked_at is not None  # marked, not deleted
    listed = {d["silo_id"]: d for d in list_enrolled(registry)}
    assert listed["silo0"]["status"] == "revoked" and listed["silo1"]["status"] == "enrolled"
    assert listed["silo0"]["identity_fingerprint"] == fingerprint(s0.identity_public)


def test_enroll_guards(registry):
    s, other = keys.new_silo_keys(), keys.new_silo_keys()
    enroll(registry, "silo0", s.identity_public, s.x25519_public)
    enroll(registry, "silo0", s.identity_public, s.x25519_public)  # same keys: no-op
    with pytest.raises(KeyStoreError, match="other keys"):
        enroll(registry, "silo0", other.identity_public, other.x25519_public)
    revoke(registry, "silo0")
    with pytest.raises(KeyStoreError, match="revoked"):
        enroll(registry, "silo0", s.identity_public, s.x25519_public)
    again = enroll(registry, "silo0", other.identity_public, other.x25519_public, replace=True)
    assert not again.revoked and lookup(registry, "silo0").x25519_public == other.x25519_public
    assert lookup(registry, "silo0").revoked_at is None
    with pytest.raises(KeyStoreError, match="invalid ed25519"):
        enroll(registry, "silo2", b"\x01" * 31, s.x25519_public)
    with pytest.raises(ValueError, match="silo id"):
        enroll(registry, "bad id!", s.identity_public, s.x25519_public)


def test_malformed_entry_in_redis_is_an_error(registry):
    registry.redis.hset(registry.key("keys", "silo", "silo9"), mapping={"ed25519": "zz", "status": "enrolled"})
    with pytest.raises(KeyStoreError, match="malformed"):
        lookup(registry, "silo9")


def test_trunk_key_publication_and_slots(registry):
    assert trunk_public_key(registry) is None
    t = keys.new_trunk_keys()
    fp = publish_trunk_key(registry, t.x25519_public)
    assert fp == t.fingerprint and trunk_public_key(registry) == t.x25519_public
    assert registry.redis.hget(registry.key("keys", "trunk"), "fingerprint") == fp
    slots = [enrollment.claim_sender_slot(registry) for _ in range(5)]
    assert slots == sorted(set(slots)) and slots[0] >= 1
    # every key lives under this run's prefix
    assert all(k.startswith(f"{registry.prefix}:run:run1:keys:") for k in registry.run_keys())
