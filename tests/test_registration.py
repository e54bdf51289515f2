"""Signed registration tokens: only an enrolled, unrevoked identity registers; no replay, no splicing."""

import pytest

from shared.crypto.keys import EnrolledSilo, new_silo_keys
from shared.crypto.registration import RegistrationError, sign_registration, verify_registration
from shared.wire.wire import FrameError

NOW = 1_800_000_000 * 10**9


@pytest.fixture
def silo():
    return new_silo_keys()


def table(keys, status="enrolled"):
    entry = EnrolledSilo("silo0", keys.identity_public, keys.x25519_public, status, 0.0)
    return lambda silo_id: entry if silo_id == "silo0" else None


def verify(token, lookup, last=None, silo_id="silo0", run="run1"):
    return verify_registration(token, run, silo_id, lookup, last, now_ns=NOW)


def reason(fn) -> str:
    with pytest.raises(RegistrationError) as err:
        fn()
    return err.value.reason


def test_valid_token_returns_its_timestamp(silo):
    assert verify(sign_registration(silo, "run1", "silo0", now_ns=NOW), table(silo)) == NOW


def test_replayed_or_older_token_is_refused(silo):
    token = sign_registration(silo, "run1", "silo0", now_ns=NOW)
    assert reason(lambda: verify(token, table(silo), last=NOW)) == "replay"


def test_other_identity_cannot_register_as_silo(silo):
    token = sign_registration(new_silo_keys(), "run1", "silo0", now_ns=NOW)
    assert reason(lambda: verify(token, table(silo))) == "bad_registration"


def test_unknown_and_revoked(silo):
    token = sign_registration(silo, "run1", "silo0", now_ns=NOW)
    assert reason(lambda: verify(token, lambda s: None)) == "unknown_silo"
    assert reason(lambda: verify(token, table(silo, "revoked"))) == "revoked"


def test_token_is_bound_to_run_and_silo(silo):
    token = sign_registration(silo, "run1", "silo0", now_ns=NOW)
    assert reason(lambda: verify(token, table(silo), run="run2")) == "bad_registration"
    assert reason(lambda: verify(token, table(silo), silo_id="silo1")) == "bad_registration"


def test_every_flipped_bit_is_refused(silo):
    token = sign_registration(silo, "run1", "silo0", now_ns=NOW)
    for i in range(len(token) * 8):
        bad = bytearray(token)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(FrameError):  # RegistrationError, or a malformed id field
            verify(bytes(bad), table(silo))


def test_clock_skew_and_size(silo):
    old = sign_registration(silo, "run1", "silo0", now_ns=NOW - 10**12)
    assert reason(lambda: verify(old, table(silo))) == "bad_registration"
    assert reason(lambda: verify(b"short", table(silo))) == "bad_registration"
