"""Secure aggregation of the silos' head/tail weights: the aggregator learns only the sum.

Pairwise masking (Bonawitz et al., CCS 2017, without the dropout-recovery shares): every pair of
participating silos (i, j) derives a shared key from their enrolled static X25519 keys, expands it
with AES-256-CTR into a mask vector, and silo i adds the mask while silo j subtracts it. Summed
over all participants the masks cancel exactly, because everything is an integer modulo 2**64:

    upload_i = q(n_i * x_i) + sum_{j > i} PRG(k_ij) - sum_{j < i} PRG(k_ij)      (mod 2**64)
    sum_i upload_i = sum_i q(n_i * x_i)                                         (mod 2**64)

q() is fixed point with FRACTION_BITS fractional bits, so the weighted average comes back to
within 2**-FRACTION_BITS per element of plain FedAvg. The last element of every vector is the
weight n_i itself, so the sum also carries sum_i n_i and the result needs nothing else.

Dropouts: the key derivation binds the round, the attempt number and the exact participant set.
If a silo drops before the commit point (every upload in), the aggregator starts a new attempt
with the smaller set and every remaining silo masks again; uploads of different attempts never
combine, and two uploads of one silo differ only by masks the aggregator cannot compute.

The aggregator (the broker) only sums: ``sum_uploads``. Masking and unmasking happen on silos.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRACTION_BITS = 32  # resolution 2.3e-10; |sum of n_i * x_i| must stay below 2**31 per element
MIN_PARTICIPANTS = 2  # with one participant the "sum" is that silo's own weights


class SecureAggError(RuntimeError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ---------------------------------------------------------------- fixed point


def flatten(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parameters as one float64 vector, in a fixed order (every silo has the same layout)."""
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])


def unflatten_into(params: Sequence[torch.Tensor], vector: torch.Tensor) -> None:
    """Copy ``vector`` back into ``params`` (in place, keeping dtype and device)."""
    expected = sum(p.numel() for p in params)
    if expected != vector.numel():
        raise SecureAggError("shape", f"aggregate has {vector.numel()} elements, the parameters {expected}")
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(vector[offset:offset + n].view_as(p).to(p.dtype))
            offset += n


def quantize(weighted: np.ndarray) -> np.ndarray:
    """float64 -> two's complement fixed point in uint64 (wraps like the masks do)."""
    scaled = np.rint(weighted * float(1 << FRACTION_BITS))
    if np.any(np.abs(scaled) >= float(1 << 62)):
        raise SecureAggError("overflow", "weighted parameters too large for the fixed-point range")
    return scaled.astype(np.int64).view(np.uint64)


def dequantize(total: np.ndarray) -> np.ndarray:
    return total.view(np.int64).astype(np.float64) / float(1 << FRACTION_BITS)


# ---------------------------------------------------------------- pairwise masks


def _pair_key(own: X25519PrivateKey, peer_public: bytes, run_id: str, round_no: int, attempt: int,
              pair: tuple[str, str], participants: Sequence[str]) -> bytes:
    roster = hashlib.sha256(",".join(sorted(participants)).encode()).hexdigest()
    info = f"splitfed secagg v1|{run_id}|{round_no}|{attempt}|{pair[0]}|{pair[1]}|{roster}".encode()
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _prg(key: bytes, n: int) -> np.ndarray:
    """n pseudo-random uint64 words: AES-256-CTR keystream (the key is used for this mask only)."""
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)) + enc.finalize(), dtype=np.uint64)


def mask_vector(n: int, own_id: str, own_key: X25519PrivateKey, public_of: Callable[[str], bytes],
                run_id: str, round_no: int, attempt: int, participants: Sequence[str]) -> np.ndarray:
    """Silo ``own_id``'s mask: + PRG for higher ids, - PRG for lower ids (mod 2**64)."""
    mask = np.zeros(n, dtype=np.uint64)
    for peer in participants:
        if peer == own_id:
            continue
        pair = tuple(sorted((own_id, peer)))
        stream = _prg(_pair_key(own_key, public_of(peer), run_id, round_no, attempt, pair, participants), n)
        if own_id < peer:
            mask += stream
        else:
            mask -= stream
    return mask


def _weighted_words(params: Sequence[torch.Tensor], weight: int) -> np.ndarray:
    return quantize(np.append(flatten(params).numpy() * weight, float(weight)))


def plain_upload(params: Sequence[torch.Tensor], weight: int) -> torch.Tensor:
    """An UNMASKED upload, for runs without keys (the aggregator then sees the weights)."""
    return torch.from_numpy(_weighted_words(params, weight).view(np.int64).copy())


def masked_upload(params: Sequence[torch.Tensor], weight: int, own_id: str, own_key: X25519PrivateKey,
                  public_of: Callable[[str], bytes], run_id: str, round_no: int, attempt: int,
                  participants: Sequence[str]) -> torch.Tensor:
    """What silo ``own_id`` sends the aggregator: int64 [D + 1] (same bits as the uint64 words)."""
    if own_id not in participants:
        raise SecureAggError("not_participant", f"{own_id} is not in the participant set {list(participants)}")
    if len(set(participants)) < MIN_PARTICIPANTS:
        raise SecureAggError("too_few", f"{len(set(participants))} participant(s): the sum would reveal one silo's weights")
    words = _weighted_words(params, weight)
    words = words + mask_vector(words.size, own_id, own_key, public_of, run_id, round_no, attempt,
                                             participants)
    return torch.from_numpy(words.view(np.int64).copy())


def sum_uploads(uploads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The aggregator's whole job: add the uploads modulo 2**64 (it never sees one unmasked)."""
    if not uploads:
        raise SecureAggError("empty", "no uploads to sum")
    size = uploads[0].numel()
    total = np.zeros(size, dtype=np.uint64)
    for u in uploads:
        if u.dtype != torch.int64 or u.dim() != 1 or u.numel() != size:
            raise SecureAggError("shape", f"upload {u.dtype} {tuple(u.shape)}, expected int64 [{size}]")
        total += u.numpy().view(np.uint64)
    return torch.from_numpy(total.view(np.int64).copy())


def average_from_sum(total: torch.Tensor) -> torch.Tensor:
    """FedAvg from the unmasked sum: (sum n_i x_i) / (sum n_i), float64 [D]."""
    values = dequantize(total.numpy().view(np.uint64))
    weight = values[-1]
    if weight <= 0:
        raise SecureAggError("weight", f"total weight {weight}")
    return torch.from_numpy(values[:-1] / weight)


def plain_fedavg(vectors: Sequence[torch.Tensor], weights: Sequence[int]) -> torch.Tensor:
    """Reference FedAvg in float64 (what secure aggregation must equal)."""
    total = sum(float(w) * v.to(torch.float64) for v, w in zip(vectors, weights))
    return total / float(sum(weights))
