"""Hierarchical mode, round end: average the trunk adapters over every worker of the service.

Each worker sends its weighted partial sum (sum_s n_s * theta_s over its silos, and sum_s n_s)
as a TRUNK_SYNC through the broker, which relays it to every averaging worker. The partial is
sealed with AES-256-GCM under a key derived from the trunk service's X25519 private key, which
all workers of the service hold and the broker does not: the broker relays, it cannot read.
Every worker adds the same partials in the same order (by worker id), so all end identical.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.crypto.sealing import HAS_INTO
from shared.wire.wire import FrameError

NONCE_BYTES = 12
TAG_BYTES = 16  # AES-GCM
WEIGHT_BYTES = 8
_CLEAR_BYTES = NONCE_BYTES + WEIGHT_BYTES


class TrunkSync:
    def __init__(self, run_id: str, worker_id: str, trunk_keys) -> None:
        self.run_id, self.worker_id = run_id, worker_id
        self._aead = None
        if trunk_keys is not None:
            raw = trunk_keys.x25519.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                  serialization.NoEncryption())
            key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                       info=f"splitfed trunk sync v1|{run_id}".encode()).derive(raw)
            self._aead = AESGCM(key)
        self.expected: dict[int, list[str]] = {}  # round -> workers whose partials make the sum
        self.partials: dict[int, dict[str, tuple[torch.Tensor, float]]] = {}

    # The partial is the size of a whole adapter in float64 and a worker with many silos is at its
    # fullest at a round's end: seal and open with no whole-size buffer beyond the frame itself.
    # Sealed layout: nonce | weight (float64) | AES-GCM(partial) | tag. The weight (the sum of the
    # silos' sample counts, which the broker itself sent in ROUND_END) travels in the clear but is
    # authenticated with the partial, so the partial is encrypted straight from its own buffer.
    def seal(self, rnd: int, partial: torch.Tensor, weight: float) -> torch.Tensor:
        plain = partial.detach().cpu().contiguous().numpy().view(np.uint8)
        weight_bytes = np.array([weight], dtype="<f8").tobytes()
        if self._aead is None:
            return torch.from_numpy(np.concatenate([np.frombuffer(weight_bytes, dtype=np.uint8), plain]))
        nonce = os.urandom(NONCE_BYTES)
        out = bytearray(_CLEAR_BYTES + plain.nbytes + TAG_BYTES)
        out[:_CLEAR_BYTES] = nonce + weight_bytes
        aad = self._aad(rnd, self.worker_id, weight_bytes)
        if HAS_INTO:
            self._aead.encrypt_into(nonce, plain, aad, memoryview(out)[_CLEAR_BYTES:])
        else:  # pragma: no cover - cryptography without encrypt_into
            out[_CLEAR_BYTES:] = self._aead.encrypt(nonce, plain, aad)
        return torch.frombuffer(out, dtype=torch.uint8)

    def open(self, rnd: int, sender: str, payload: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The sender's partial (a fresh buffer of our own) and its weight; FrameError when it does not open."""
        raw = payload.numpy()  # a view: no copy of the sealed bytes
        sealed = self._aead is not None
        head = _CLEAR_BYTES if sealed else WEIGHT_BYTES
        plain_bytes = len(raw) - head - (TAG_BYTES if sealed else 0)
        if plain_bytes % 8 or plain_bytes < 8:
            raise FrameError("schema", f"trunk sync of {len(raw)} bytes")
        weight_bytes = raw[head - WEIGHT_BYTES:head].tobytes()
        values = np.empty(plain_bytes // 8, dtype="<f8")
        if not sealed:
            values.view(np.uint8)[:] = raw[head:]
        else:
            from cryptography.exceptions import InvalidTag

            nonce, aad = raw[:NONCE_BYTES].tobytes(), self._aad(rnd, sender, weight_bytes)
            try:
                if HAS_INTO:
                    self._aead.decrypt_into(nonce, raw[head:], aad, values.view(np.uint8))
                else:  # pragma: no cover - cryptography without decrypt_into
                    values.view(np.uint8)[:] = np.frombuffer(self._aead.decrypt(nonce, raw[head:], aad), dtype=np.uint8)
            except (InvalidTag, ValueError) as exc:
                raise FrameError("bad_seal", f"trunk sync from {sender} does not open") from exc
        return torch.from_numpy(values), float(np.frombuffer(weight_bytes, dtype="<f8")[0])

    def forget(self, rnd: int) -> None:
        self.expected.pop(rnd, None)
        self.partials.pop(rnd, None)

    def add(self, rnd: int, sender: str, partial: tuple[torch.Tensor, float]) -> torch.Tensor | None:
        """Keep a partial; the average once every expected worker's partial is in."""
        workers = self.expected.get(rnd)
        if workers is None or sender not in workers:
            raise FrameError("unexpected_kind", f"trunk sync of round {rnd} from {sender}, not expected")
        got = self.partials.setdefault(rnd, {})
        got[sender] = partial
        if got.keys() != set(workers):
            return None
        del self.partials[rnd], self.expected[rnd]
        sizes = {v.numel() for v, _ in got.values()}
        if len(sizes) != 1:
            raise FrameError("schema", f"trunk sync partials of different sizes {sizes}")
        weight = sum(got[w][1] for w in sorted(got))
        if weight <= 0:
            raise FrameError("schema", "trunk sync with zero total weight")
        # In place, into the first partial (a buffer open() made for us): no whole-size sum besides
        # the partials themselves. Same additions in the same order as from a zero start
        # (0 + x = x; at most the sign of an exact zero differs).
        first, *rest = sorted(got)
        total = got[first][0]
        for w in rest:
            total.add_(got[w][0])
        return total.div_(weight)

    def _aad(self, rnd: int, sender: str, weight_bytes: bytes) -> bytes:
        return f"{self.run_id}|{rnd}|{sender}|".encode() + weight_bytes
