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

from shared.wire import FrameError

NONCE_BYTES = 12


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

    @staticmethod
    def parse_round_end(text: str) -> tuple[list[str], dict[str, int]]:
        """"w0,w1;silo0:100,silo1:80" -> (workers, weights); FrameError when malformed."""
        try:
            workers_part, weights_part = text.split(";")
            workers = [w for w in workers_part.split(",") if w]
            weights = {s: int(n) for s, n in (kv.split(":") for kv in weights_part.split(",") if kv)}
        except ValueError as exc:
            raise FrameError("schema", f"bad ROUND_END text {text[:80]!r}") from exc
        if not workers or not weights or any(n < 0 for n in weights.values()):
            raise FrameError("schema", f"bad ROUND_END text {text[:80]!r}")
        return workers, weights

    # The partial is the size of a whole adapter in float64 and a worker with many silos is at its
    # fullest at a round's end: seal and open with as few whole-size copies as the AEAD allows.
    def seal(self, rnd: int, partial: torch.Tensor, weight: float) -> torch.Tensor:
        plain = np.empty(partial.numel() + 1, dtype="<f8")
        plain[:-1] = partial.numpy()
        plain[-1] = weight
        if self._aead is None:
            return torch.from_numpy(plain.view(np.uint8))
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plain.view(np.uint8), self._aad(rnd, self.worker_id))
        del plain
        out = bytearray(NONCE_BYTES + len(sealed))
        out[:NONCE_BYTES], out[NONCE_BYTES:] = nonce, sealed
        return torch.frombuffer(out, dtype=torch.uint8)

    def open(self, rnd: int, sender: str, payload: torch.Tensor) -> tuple[torch.Tensor, float]:
        raw = payload.numpy()  # a view: no copy of the sealed bytes
        if self._aead is not None:
            from cryptography.exceptions import InvalidTag

            try:
                raw = self._aead.decrypt(raw[:NONCE_BYTES].tobytes(), raw[NONCE_BYTES:], self._aad(rnd, sender))
            except (InvalidTag, ValueError) as exc:
                raise FrameError("bad_seal", f"trunk sync from {sender} does not open") from exc
        if len(raw) % 8 or len(raw) < 16:
            raise FrameError("schema", f"trunk sync of {len(raw)} bytes")
        values = torch.from_numpy(np.frombuffer(raw, dtype="<f8").copy())
        return values[:-1], float(values[-1])

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
        total = sum((got[w][0] for w in sorted(got)), torch.zeros(sizes.pop(), dtype=torch.float64))
        weight = sum(got[w][1] for w in sorted(got))
        if weight <= 0:
            raise FrameError("schema", "trunk sync with zero total weight")
        return total / weight

    def _aad(self, rnd: int, sender: str) -> bytes:
        return f"{self.run_id}|{rnd}|{sender}".encode()
