"""The participants' keys the broker hands a silo with AGG_START: a swapped one never gets masked towards."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.crypto import certificates, keys
from shared.crypto.certificates import CertificateError
from shared.crypto.peer_keys import HandedKeys, PeerEntry, PeerKeys
from shared.wire.wire import FrameError

RUN = "run1"


@pytest.fixture(scope="module")
def operator():
    return Ed25519PrivateKey.generate()


def _entry(operator, silo_id: str, silo: keys.SiloKeys, epoch: int = 0) -> PeerEntry:
    cert = certificates.issue(operator, RUN, silo_id, silo.identity_public, silo.x25519_public, epoch)
    return PeerEntry(silo_id, silo.identity_public, silo.x25519_public, cert)


def _pin(operator) -> str:
    return keys.fingerprint(certificates.operator_public(operator))


def test_handed_keys_round_trip_and_verify(operator):
    a, b = keys.new_silo_keys(), keys.new_silo_keys()
    handed = PeerKeys((_entry(operator, "silo0", a), _entry(operator, "silo1", b)), certificates.operator_public(operator),
                      certificates.sign_revocations(operator, RUN, 1, {"silo9": 1}))
    assert PeerKeys.from_wire(handed.to_wire()) == handed
    taker = HandedKeys(RUN, _pin(operator))
    taker.take(handed.to_wire())
    assert taker.keys == {"silo0": a.x25519_public, "silo1": b.x25519_public}


def test_a_broker_swapping_a_peers_key_is_refused(operator):
    a, rogue = keys.new_silo_keys(), keys.new_silo_keys()
    good = _entry(operator, "silo0", a)
    swapped = PeerEntry("silo0", a.identity_public, rogue.x25519_public, good.certificate)
    taker = HandedKeys(RUN, _pin(operator))
    with pytest.raises(CertificateError, match="directory_tampered"):
        taker.take(PeerKeys((swapped,), certificates.operator_public(operator)).to_wire())
    with pytest.raises(CertificateError, match="bad_certificate"):  # no certificate at all
        taker.take(PeerKeys((PeerEntry("silo0", a.identity_public, rogue.x25519_public),),
                            certificates.operator_public(operator)).to_wire())
    other = Ed25519PrivateKey.generate()  # a consistent set signed by another operator
    with pytest.raises(CertificateError, match="bad_operator_key"):
        taker.take(PeerKeys((_entry(other, "silo0", rogue),), certificates.operator_public(other)).to_wire())
    assert taker.keys == {}  # nothing was taken from a refused set


def test_without_a_pin_the_brokers_word_is_taken():
    a = keys.new_silo_keys()
    taker = HandedKeys(RUN, None)
    taker.take(PeerKeys((PeerEntry("silo0", a.identity_public, a.x25519_public),)).to_wire())
    assert taker.keys == {"silo0": a.x25519_public}


def test_malformed_payloads_are_refused(operator):
    raw = PeerKeys((_entry(operator, "silo0", keys.new_silo_keys()),), certificates.operator_public(operator)).to_wire()
    for bad in (b"", raw[:10], raw[:-1], raw + b"\0", b"XXXX" + raw[4:], raw[:6] + b"\xff\xff" + raw[8:]):
        with pytest.raises(FrameError, match="bad_peer_keys"):
            PeerKeys.from_wire(bad)
