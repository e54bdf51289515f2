"""The AEAD units of one sealed payload: nonce, associated data and byte spans of each.

An unchunked payload is one unit, as it always was:

    nonce = direction label (3 bytes, b"S>T" / b"T>S") + payload index (u8) + seq (u64)
    aad   = the header bytes

A chunked payload (shared/wire/chunks.py) is one unit per chunk, each sealed on its own:

    nonce = direction mark (1 byte, b"s" / b"t") + payload index (u8) + chunk index (u16) + seq (u64)
    aad   = the header bytes + "SPCK" + payload index (u8) + chunk index (u32) + chunk count (u32)

So every chunk has its own nonce under the direction's key (the seq is fresh per message; the
chunk marks differ from the labels' first bytes, so a chunk nonce never equals a payload nonce), and
its tag binds the whole header (kind, run, silo, round, step, shapes, chunking), its position and
the count: chunks cannot be reordered, dropped, duplicated or spliced into another message or
another payload of the same one without a tag failing.

The ciphertext of a payload is laid out chunk after chunk, each followed by its 16-byte tag, in one
buffer; each chunk's span of it is one frame.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from shared.wire.chunks import chunk_bounds, chunk_count
from shared.wire.header import TensorDesc
from shared.wire.protocol import SEAL_OVERHEAD

_NONCE = struct.Struct("<3sBQ")  # 12 bytes: label, payload index, seq
_CHUNK_NONCE = struct.Struct("<cBHQ")  # 12 bytes: mark, payload index, chunk index, seq
_CHUNK_AAD = struct.Struct("<4sBII")
_CHUNK_MAGIC = b"SPCK"


def sealed_nbytes(desc: TensorDesc) -> int:
    """Bytes of a payload's ciphertext: its plaintext plus one tag per frame."""
    return desc.nbytes + SEAL_OVERHEAD * desc.n_frames


def sealed_frame_sizes(desc: TensorDesc) -> list[int]:
    """The exact size of each sealed frame of a payload (one per chunk)."""
    return [b - a + SEAL_OVERHEAD for a, b in chunk_bounds(desc.nbytes, desc.chunk_shift)]


def units(label: bytes, index: int, desc: TensorDesc, seq: int, aad: bytes
          ) -> Iterator[tuple[bytes, bytes, tuple[int, int], tuple[int, int]]]:
    """(nonce, associated data, plaintext span, ciphertext span) of each unit of payload ``index``."""
    if not desc.chunk_shift:
        yield _NONCE.pack(label, index, seq), aad, (0, desc.nbytes), (0, desc.nbytes + SEAL_OVERHEAD)
        return
    mark = label[:1].lower()
    count = chunk_count(desc.nbytes, desc.chunk_shift)
    for j, (a, b) in enumerate(chunk_bounds(desc.nbytes, desc.chunk_shift)):
        at = a + j * SEAL_OVERHEAD
        yield (_CHUNK_NONCE.pack(mark, index, j, seq), aad + _CHUNK_AAD.pack(_CHUNK_MAGIC, index, j, count),
               (a, b), (at, at + (b - a) + SEAL_OVERHEAD))
