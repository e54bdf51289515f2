"""Sealed frames and the per-round handshake: every tampering, replay and impersonation is refused."""

from __future__ import annotations

import struct
import time

import pytest
import torch

from shared.crypto import enrollment, keys
from shared.crypto.handshake import HELLO_SIZE, HelloGuard, accept_hello, make_hello, peek_hello
from shared.crypto.enrollment import enroll, revoke
from shared.crypto.keys import fingerprint
from shared.wire.protocol import Kind
from shared.crypto.sealing import ACK_SIZE, ReplayWindow, SealError, open_message, seal_message
from shared.wire.wire import (
    HEADER,
    FrameError,
    Header,
    Message,
    TensorDesc,
    header_from_wire,
    header_to_wire,
    message_to_wire,
    split_frames,
)

RUN = "run1"
PATTERN = b"PLAINTEXT-MARKER"  # 16 bytes = 4 float32s: recognisable in any byte stream


# ---------------------------------------------------------------- helpers


class Party:
    def __init__(self, silo_id: str) -> None:
        self.silo_id = silo_id
        self.keys = keys.new_silo_keys()


@pytest.fixture
def trunk():
    return keys.new_trunk_keys()


@pytest.fixture
def silo_a():
    return Party("siloA")


@pytest.fixture
def silo_b():
    return Party("siloB")


@pytest.fixture
def allow(registry, silo_a, silo_b):
    """Both silos enrolled in real Redis; returns the lookup function a trunk worker would use."""
    for p in (silo_a, silo_b):
        enroll(registry, p.silo_id, p.keys.identity_public, p.keys.x25519_public)
    return lambda sid: enrollment.lookup(registry, sid)


def handshake(party, trunk, lookup_fn, round_no=0, cipher="aes-gcm", **accept_kw):
    hello, pending = make_hello(party.keys, party.silo_id, RUN, round_no, cipher=cipher)
    trunk_side = accept_hello(hello, trunk, lookup_fn, RUN, **accept_kw)
    silo_side = pending.complete_ack(trunk_side.ack(), trunk.fingerprint)
    return silo_side, trunk_side


def pattern_tensor(b=2, t=3, h=8) -> torch.Tensor:
    raw = (PATTERN * (b * t * h * 4 // len(PATTERN) + 1))[: b * t * h * 4]
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).view(b, t, h).clone()


def forward(silo_id, round_no=0, step=1, hidden=None) -> Message:
    hidden = pattern_tensor() if hidden is None else hidden
    b, t = hidden.shape[:2]
    return Message(Kind.FORWARD, RUN, silo_id, round=round_no, step=step, tensors=[
        hidden, torch.ones(b, t, dtype=torch.uint8), torch.arange(t, dtype=torch.int64).expand(b, t).contiguous()])


def refused(session, frames, reason=None):
    with pytest.raises(FrameError) as err:
        open_message(session, frames)
    if reason is not None:
        assert err.value.reason == reason, err.value
    return err.value


def as_bytes(frames):
    return [bytes(f) for f in frames]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("cipher", ["aes-gcm", "chacha20"])
def test_round_trip_both_directions(cipher, trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow, cipher=cipher)
    assert silo.cipher == trunk_s.cipher == cipher
    msg = forward(silo_a.silo_id, step=4)
    got = open_message(trunk_s, as_bytes(seal_message(silo, msg)))
    assert got.kind == Kind.FORWARD and got.step == 4
    for a, b in zip(msg.tensors, got.tensors):
        assert torch.equal(a, b)
    reply = Message(Kind.FORWARD_RESULT, RUN, silo_a.silo_id, step=4, tensors=[msg.tensors[0] * 2])
    back = open_message(silo, as_bytes(seal_message(trunk_s, reply)))
    assert torch.equal(back.tensors[0], msg.tensors[0] * 2)


def test_the_more_pieces_flag_is_sealed_with_the_header(trunk, silo_a, allow):
    """The broker reads FLAG_MORE to group micro-batches; it cannot change it unnoticed."""
    silo, trunk_s = handshake(silo_a, trunk, allow)
    msg = forward(silo_a.silo_id)
    msg.more = True
    frames = as_bytes(seal_message(silo, msg))
    assert split_frames(frames)[0].more
    cleared = bytearray(frames[0])
    cleared[6] &= ~4
    refused(trunk_s, [bytes(cleared), *frames[1:]])
    assert open_message(trunk_s, frames).more


def test_sealed_frames_pass_split_frames_and_hide_plaintext(trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    msg = forward(silo_a.silo_id)
    plain = b"".join(as_bytes(message_to_wire(msg)))
    assert PATTERN in plain  # the marker is there before sealing...
    frames = as_bytes(seal_message(silo, msg))
    header, _, payloads, _ = split_frames(frames)  # what the broker checks: structure only
    assert header.sealed and header.silo_id == silo_a.silo_id
    assert PATTERN not in b"".join(frames)  # ...and nowhere in what the broker forwards
    assert all(PATTERN[:8] not in p for p in frames[1:])


# ---------------------------------------------------------------- tampering


def test_any_flipped_header_bit_is_rejected(trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    frames = as_bytes(seal_message(silo, forward(silo_a.silo_id)))
    header = frames[0]
    for bit in range(len(header) * 8):
        bad = bytearray(header)
        bad[bit // 8] ^= 1 << (bit % 8)
        refused(trunk_s, [bytes(bad), *frames[1:]])
    open_message(trunk_s, frames)  # rejections consumed nothing: the honest frame still opens


def test_any_flipped_payload_bit_is_rejected(trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    frames = as_bytes(seal_message(silo, forward(silo_a.silo_id, hidden=pattern_tensor(1, 2, 2))))
    for i in range(1, len(frames)):
        for bit in range(len(frames[i]) * 8):  # ciphertext and tag bits
            bad = bytearray(frames[i])
            bad[bit // 8] ^= 1 << (bit % 8)
            refused(trunk_s, [*frames[:i], bytes(bad), *frames[i + 1:]], "bad_tag")
    open_message(trunk_s, frames)


def test_truncated_or_extended_payload_is_rejected(trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    frames = as_bytes(seal_message(silo, forward(silo_a.silo_id)))
    refused(trunk_s, [frames[0], frames[1][:-1], *frames[2:]], "size_mismatch")
    refused(trunk_s, [frames[0], frames[1] + b"\0", *frames[2:]], "size_mismatch")
    refused(trunk_s, frames[:-1], "frame_count")


def test_replay_is_rejected(trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    frames = as_bytes(seal_message(silo, forward(silo_a.silo_id)))
    open_message(trunk_s, frames)
    refused(trunk_s, frames, "replay")


def test_reordering_within_window_ok_but_old_frames_refused(trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    sealed = [as_bytes(seal_message(silo, forward(silo_a.silo_id, step=i))) for i in range(70)]
    open_message(trunk_s, sealed[5])
    open_message(trunk_s, sealed[3])  # late but within the window
    refused(trunk_s, sealed[3], "replay")
    open_message(trunk_s, sealed[69])
    err = refused(trunk_s, sealed[4], "replay")  # 65 behind the newest: outside a 64 window
    assert "older" in err.detail


def _spliced(frames, **changes):
    h = header_from_wire(frames[0])
    fields = {f: getattr(h, f) for f in ("kind", "run_id", "silo_id", "round", "step", "seq", "flags", "tensors")}
    fields.update(changes)
    return [header_to_wire(Header(**fields)), *frames[1:]]


def test_splicing_onto_another_header_is_rejected(trunk, silo_a, silo_b, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    frames = as_bytes(seal_message(silo, forward(silo_a.silo_id, step=7)))
    h = header_from_wire(frames[0])
    refused(trunk_s, _spliced(frames, step=8), "bad_tag")
    # same byte count, other shape: [2,3,8] -> [3,2,8] keeps the payload length
    d0 = h.tensors[0]
    refused(trunk_s, _spliced(frames, tensors=(TensorDesc(d0.dtype, (3, 2, 8)), *h.tensors[1:])), "bad_tag")
    refused(trunk_s, _spliced(frames, kind=Kind.BACKWARD, tensors=h.tensors), "bad_tag")
    # other silo in the header: the receiving session is not that silo's
    refused(trunk_s, _spliced(frames, silo_id=silo_b.silo_id), "wrong_session")
    refused(trunk_s, _spliced(frames, round=1), "wrong_session")
    # another seq (counter) than the one sealed: the nonce differs
    refused(trunk_s, _spliced(frames, seq=h.seq + 1), "bad_tag")
    open_message(trunk_s, frames)


def test_swapped_payloads_are_rejected(trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    # hidden float32 [1,4,2] and positions int64 [1,4] are both 32 bytes: a swap keeps every length
    hidden = torch.arange(8, dtype=torch.float32).view(1, 4, 2)
    frames = as_bytes(seal_message(silo, forward(silo_a.silo_id, hidden=hidden)))
    assert len(frames[1]) == len(frames[3])
    refused(trunk_s, [frames[0], frames[3], frames[2], frames[1]], "bad_tag")
    # even with the descriptors swapped to match, positions are bound to the payload index
    h = header_from_wire(frames[0])
    t = h.tensors
    refused(trunk_s, _spliced([frames[0], frames[3], frames[2], frames[1]], tensors=(t[2], t[1], t[0])), "bad_tag")


def test_reflected_frame_is_rejected(trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    frames = as_bytes(seal_message(silo, forward(silo_a.silo_id)))
    refused(silo, frames, "bad_tag")  # the silo's own frame echoed back: other direction key/label


def test_unsealed_frame_is_refused_by_a_session(trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    refused(trunk_s, as_bytes(message_to_wire(forward(silo_a.silo_id))), "not_sealed")


# ---------------------------------------------------------------- identities


def test_one_silo_cannot_open_another_silos_frames(trunk, silo_a, silo_b, allow):
    a_silo, a_trunk = handshake(silo_a, trunk, allow)
    b_silo, b_trunk = handshake(silo_b, trunk, allow)
    from_a = as_bytes(seal_message(a_silo, forward(silo_a.silo_id)))
    refused(b_trunk, from_a, "wrong_session")
    refused(b_trunk, _spliced(from_a, silo_id=silo_b.silo_id), "bad_tag")  # relabelled: still B's key can't
    to_a = as_bytes(seal_message(a_trunk, Message(Kind.FORWARD_RESULT, RUN, silo_a.silo_id,
                                                  tensors=[pattern_tensor()])))
    refused(b_silo, _spliced(to_a, silo_id=silo_b.silo_id), "bad_tag")
    open_message(a_silo, to_a)


def test_unenrolled_silo_cannot_open_a_session(trunk, registry, allow):
    stranger = Party("siloX")
    hello, _ = make_hello(stranger.keys, stranger.silo_id, RUN, 0)
    with pytest.raises(SealError) as err:
        accept_hello(hello, trunk, allow, RUN)
    assert err.value.reason == "unknown_silo"


def test_revoked_silo_cannot_open_a_session(trunk, registry, silo_a, allow):
    handshake(silo_a, trunk, allow)
    revoke(registry, silo_a.silo_id)
    hello, _ = make_hello(silo_a.keys, silo_a.silo_id, RUN, 1)
    with pytest.raises(SealError) as err:
        accept_hello(hello, trunk, allow, RUN)
    assert err.value.reason == "revoked"


def test_impersonation_with_own_keys_is_rejected(trunk, silo_a, silo_b, allow):
    # silo B signs a hello claiming to be silo A
    hello, _ = make_hello(silo_b.keys, silo_a.silo_id, RUN, 0)
    with pytest.raises(SealError) as err:
        accept_hello(hello, trunk, allow, RUN)
    assert err.value.reason == "bad_hello_signature"


def test_every_flipped_hello_bit_is_rejected(trunk, silo_a, allow):
    hello, _ = make_hello(silo_a.keys, silo_a.silo_id, RUN, 0)
    assert len(hello) == HELLO_SIZE
    for bit in range(len(hello) * 8):
        bad = bytearray(hello)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(SealError):
            accept_hello(bytes(bad), trunk, allow, RUN)
    accept_hello(hello, trunk, allow, RUN)


def test_hello_policy_checks(trunk, silo_a, allow):
    hello, _ = make_hello(silo_a.keys, silo_a.silo_id, RUN, 3)
    cases = [
        (dict(hello=hello[:-1]), "bad_hello"),
        (dict(run_id="run2"), "wrong_run"),
        (dict(expected_round=4), "wrong_round"),
        (dict(now_ns=time.time_ns() + 10**12), "stale_hello"),
        (dict(allowed_ciphers=("chacha20",)), "bad_cipher"),
    ]
    for kw, reason in cases:
        args = {"hello": hello, "run_id": RUN, **kw}
        with pytest.raises(SealError) as err:
            accept_hello(args.pop("hello"), trunk, allow, args.pop("run_id"), **args)
        assert err.value.reason == reason
    assert peek_hello(hello).round == 3


def test_static_key_must_match_enrollment(trunk, registry, silo_a, allow):
    new_x = keys.new_silo_keys().x25519
    rotated = keys.SiloKeys(silo_a.keys.identity, new_x)  # signed by the right identity, other X25519
    hello, _ = make_hello(rotated, silo_a.silo_id, RUN, 0)
    with pytest.raises(SealError) as err:
        accept_hello(hello, trunk, allow, RUN)
    assert err.value.reason == "key_mismatch"


def test_replayed_hello_is_refused_by_the_guard(trunk, silo_a, allow):
    guard = HelloGuard()
    hello0, _ = make_hello(silo_a.keys, silo_a.silo_id, RUN, 0)
    hello1, _ = make_hello(silo_a.keys, silo_a.silo_id, RUN, 1)
    accept_hello(hello0, trunk, allow, RUN, guard=guard)
    accept_hello(hello1, trunk, allow, RUN, guard=guard)
    for old in (hello1, hello0):
        with pytest.raises(SealError) as err:
            accept_hello(old, trunk, allow, RUN, guard=guard)
        assert err.value.reason == "stale_hello"


def test_a_rollback_hello_for_an_earlier_round_is_fresh_but_recorded_ones_stay_refused(trunk, silo_a, allow):
    """A broker restart rolls the run back to its last committed round: a silo that already
    handshook round 1 sends a NEW hello for round 0. It is accepted (it is signed later); the
    recorded round-1 and round-0 hellos are still refused (issue 14, item 1)."""
    guard = HelloGuard()
    t = time.time_ns()
    recorded0, _ = make_hello(silo_a.keys, silo_a.silo_id, RUN, 0, now_ns=t)
    recorded1, _ = make_hello(silo_a.keys, silo_a.silo_id, RUN, 1, now_ns=t + 1)
    rollback0, _ = make_hello(silo_a.keys, silo_a.silo_id, RUN, 0, now_ns=t + 2)
    accept_hello(recorded0, trunk, allow, RUN, guard=guard)
    accept_hello(recorded1, trunk, allow, RUN, guard=guard)
    assert accept_hello(rollback0, trunk, allow, RUN, guard=guard).round == 0
    for old in (recorded1, recorded0, rollback0):
        with pytest.raises(SealError) as err:
            accept_hello(old, trunk, allow, RUN, guard=guard)
        assert err.value.reason == "stale_hello"


# ---------------------------------------------------------------- pinning and key confirmation


def test_fingerprint_pinning(trunk, silo_a, allow):
    hello, pending = make_hello(silo_a.keys, silo_a.silo_id, RUN, 0)
    trunk_s = accept_hello(hello, trunk, allow, RUN)
    impostor = keys.new_trunk_keys()
    for pin in (impostor.fingerprint, "", None, "sha256:nothex"):
        with pytest.raises(SealError) as err:
            pending.complete(trunk.x25519_public, pin)
        assert err.value.reason == "fingerprint_mismatch"
    with pytest.raises(SealError) as err:
        pending.complete(impostor.x25519_public, trunk.fingerprint)
    assert err.value.reason == "fingerprint_mismatch" and "pinned" in str(err.value)
    # a human-formatted pin is fine
    silo = pending.complete_ack(trunk_s.ack(), keys.display_fingerprint(trunk.fingerprint))
    assert silo.trunk_fingerprint == fingerprint(trunk.x25519_public)
    with pytest.raises(ValueError, match="already completed"):
        pending.complete(trunk.x25519_public, trunk.fingerprint)


def test_ack_from_a_trunk_with_another_key_fails_confirmation(trunk, silo_a, allow):
    hello, pending = make_hello(silo_a.keys, silo_a.silo_id, RUN, 0)
    other_hello, _ = make_hello(silo_a.keys, silo_a.silo_id, RUN, 0)
    unrelated = accept_hello(other_hello, trunk, allow, RUN).ack()  # same trunk key, other session
    assert len(unrelated) == ACK_SIZE
    with pytest.raises(SealError) as err:
        pending.complete_ack(unrelated, trunk.fingerprint)
    assert err.value.reason == "bad_ack"


def test_rekey_every_round_gives_fresh_keys(trunk, silo_a, allow):
    s0, t0 = handshake(silo_a, trunk, allow, round_no=0)
    s1, t1 = handshake(silo_a, trunk, allow, round_no=1)
    assert s0.transcript != s1.transcript
    frames0 = as_bytes(seal_message(s0, forward(silo_a.silo_id, round_no=0)))
    refused(t1, _spliced(frames0, round=1), "bad_tag")  # old round's key does not open under the new one
    # a second hello in the same round also yields a different key
    s0b, t0b = handshake(silo_a, trunk, allow, round_no=0)
    refused(t0b, frames0, "bad_tag")
    open_message(t0, frames0)


# ---------------------------------------------------------------- nonces and counters


class _NonceRecorder:
    def __init__(self, inner):
        self.inner, self.nonces = inner, []

    def encrypt_into(self, nonce, data, aad, buf):
        self.nonces.append(bytes(nonce))
        return self.inner.encrypt_into(nonce, data, aad, buf)

    def encrypt(self, nonce, data, aad):
        self.nonces.append(bytes(nonce))
        return self.inner.encrypt(nonce, data, aad)


def test_nonces_never_repeat_across_10000_seals(trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    rec = silo._send = _NonceRecorder(silo._send)
    msg = forward(silo_a.silo_id, hidden=torch.zeros(1, 1, 4))
    seqs = []
    for _ in range(10_000):
        frames = seal_message(silo, msg)
        seqs.append(header_from_wire(frames[0]).seq)
    assert len(rec.nonces) == 30_000 and len(set(rec.nonces)) == 30_000
    assert seqs == sorted(set(seqs))  # strictly increasing


def test_trunk_workers_with_distinct_slots_never_share_nonces(trunk, silo_a, allow):
    # two trunk workers derive the same session from one hello and both seal to the silo
    hello, pending = make_hello(silo_a.keys, silo_a.silo_id, RUN, 0)
    w1 = accept_hello(hello, trunk, allow, RUN, sender_slot=1)
    w2 = accept_hello(hello, trunk, allow, RUN, sender_slot=2)
    silo = pending.complete_ack(w1.ack(), trunk.fingerprint)
    r1, r2 = _NonceRecorder(w1._send), _NonceRecorder(w2._send)
    w1._send, w2._send = r1, r2
    reply = Message(Kind.FORWARD_RESULT, RUN, silo_a.silo_id, tensors=[pattern_tensor()])
    out = [as_bytes(seal_message(w, reply)) for _ in range(50) for w in (w1, w2)]
    assert not set(r1.nonces) & set(r2.nonces)
    for frames in out:
        open_message(silo, frames)
    refused(silo, out[0], "replay")


def test_replay_window_unit():
    w = ReplayWindow(64)
    for c in (1, 2, 5):
        assert w.problem(c) is None
        w.record(c)
    assert w.problem(5) and w.problem(1) and w.problem(3) is None
    w.record(2**32 - 1)  # a huge jump must not build a huge bitmap
    assert w.bits == 1 and w.problem(5) and w.problem(2**32 - 2) is None


def test_counter_zero_and_wrong_flags(trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    frames = as_bytes(seal_message(silo, forward(silo_a.silo_id)))
    bad = bytearray(frames[0])
    struct.pack_into("<Q", bad, HEADER.size - 8, 0)  # seq is the header's last fixed field
    refused(trunk_s, [bytes(bad), *frames[1:]], "bad_field")
    with pytest.raises(SealError) as err:  # text frames would travel unauthenticated: refused
        seal_message(silo, Message(Kind.FORWARD, RUN, silo_a.silo_id, tensors=forward("x").tensors, text="hi"))
    assert err.value.reason == "bad_field"


def test_open_into_caller_buffers_and_zeroed_on_failure(trunk, silo_a, allow):
    import numpy as np

    silo, trunk_s = handshake(silo_a, trunk, allow)
    frames = as_bytes(seal_message(silo, forward(silo_a.silo_id)))
    header, hb, payloads, _ = split_frames(frames)
    out = [np.full(d.nbytes, 0xAA, np.uint8) for d in header.tensors]
    bad = [payloads[0], payloads[1], payloads[2][:-1] + bytes([payloads[2][-1] ^ 1])]
    with pytest.raises(SealError):
        trunk_s.open(hb, bad, out=out, header=header)
    assert all(not o.any() for o in out)  # no unauthenticated plaintext left behind
    bufs = trunk_s.open(hb, payloads, out=out, header=header)
    assert bytes(bufs[0][:16]) == PATTERN


def test_wire_dtypes_survive_sealing(trunk, silo_a, allow):
    silo, trunk_s = handshake(silo_a, trunk, allow)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        h = torch.randn(2, 3, 4).to(dtype)
        msg = Message(Kind.BACKWARD, RUN, silo_a.silo_id, step=1, tensors=[h])
        got = open_message(trunk_s, as_bytes(seal_message(silo, msg)))
        assert got.tensors[0].dtype == dtype and torch.equal(got.tensors[0], h)
