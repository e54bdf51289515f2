"""Seal/open throughput of one session pair, in memory (no sockets, no Redis, no key files).

Used by ``splitfed bench crypto`` (wiring is the CLI's job). MB/s are 10**6 bytes of plaintext per
second, single thread, timing only ``Session.seal`` / ``Session.open`` (header checks, nonce,
AEAD, buffer allocation), which is exactly what a role adds per frame.
"""

from __future__ import annotations

import time

import numpy as np

from shared.crypto.handshake import accept_hello, make_hello
from shared.crypto.keys import EnrolledSilo, new_silo_keys, new_trunk_keys
from shared.wire.protocol import Kind, WireDtype
from shared.crypto.sealing import HAS_INTO
from shared.wire.wire import Header, TensorDesc, header_to_wire

SIZES = (1 << 20, 16 << 20)
CIPHER_NAMES = ("aes-gcm", "chacha20")


def session_pair(cipher: str = "aes-gcm", silo_id: str = "bench", run_id: str = "bench", round_no: int = 0,
                 max_tensor_bytes: int = 1 << 30):
    """(silo session, trunk session) from throwaway keys: a full handshake, nothing persisted."""
    silo, trunk = new_silo_keys(), new_trunk_keys()
    enrolled = EnrolledSilo(silo_id, silo.identity_public, silo.x25519_public, "enrolled", time.time())
    hello, pending = make_hello(silo, silo_id, run_id, round_no, cipher=cipher, max_tensor_bytes=max_tensor_bytes)
    trunk_side = accept_hello(hello, trunk, {silo_id: enrolled}.get, run_id, max_tensor_bytes=max_tensor_bytes)
    silo_side = pending.complete_ack(trunk_side.ack(), trunk.fingerprint)
    return silo_side, trunk_side


def bench_seal_open(size_bytes: int, repeats: int = 20, cipher: str = "aes-gcm") -> dict:
    """Seal on the silo side and open on the trunk side ``repeats`` times; report MB/s of each."""
    silo, trunk = session_pair(cipher, max_tensor_bytes=max(size_bytes, 1024))
    payload = np.random.default_rng(0).integers(0, 256, size_bytes, dtype=np.uint8)
    header = header_to_wire(Header(Kind.FORWARD_RESULT, "bench", "bench", 0, 0, 0, 0,
                                   (TensorDesc(WireDtype.UINT8, (size_bytes,)),)))
    seal_s = open_s = 0.0
    frames = silo.seal(header, [payload])  # warm-up: page faults, cipher context
    trunk.open(frames[0], frames[1:])
    for _ in range(repeats):
        t0 = time.perf_counter()
        frames = silo.seal(header, [payload])
        t1 = time.perf_counter()
        plain = trunk.open(frames[0], frames[1:])
        t2 = time.perf_counter()
        seal_s += t1 - t0
        open_s += t2 - t1
    if bytes(plain[0][:64]) != payload[:64].tobytes():
        raise RuntimeError("sealed round trip did not return the payload")
    total = size_bytes * repeats / 1e6
    return {
        "cipher": cipher,
        "size_bytes": size_bytes,
        "repeats": repeats,
        "MBps_seal": round(total / seal_s, 1),
        "MBps_open": round(total / open_s, 1),
        "MBps_seal_open": round(total / (seal_s + open_s), 1),
        "into_buffers": HAS_INTO,
    }


def bench_all(repeats: int = 20) -> list[dict]:
    return [bench_seal_open(size, repeats, cipher) for cipher in CIPHER_NAMES for size in SIZES]


if __name__ == "__main__":  # python -m splitfed.bench.crypto
    import json

    print(json.dumps(bench_all(), indent=1))
