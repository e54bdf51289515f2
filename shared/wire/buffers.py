"""Reusable payload buffers for the per-step hot path (sealing output, opened plaintext).

A training step moves four [B, T, H] tensors. Allocating a fresh multi-MiB buffer for each sealed
or opened payload costs page faults and allocator work every step; a pool hands the same memory out
again. The hard part of reuse is knowing when a buffer is free: a received activation may still be
held by an autograd graph (the trunk keeps h1 until its BACKWARD arrives; with micro-batches several
at once), and a sealed frame sent with ``copy=False`` is read by ZeroMQ's I/O thread after
``send_multipart`` returns. Every such holder keeps a Python reference to the buffer's numpy array
(a memoryview, a tensor from ``torch.frombuffer``, a zmq frame), so the pool reuses an array only
when its reference count says that nothing but the pool holds it. No release protocol to get wrong:
a buffer still in use is never overwritten, at worst a new one is allocated.
"""

from __future__ import annotations

import sys

import numpy as np

# Below this size a fresh allocation is cheap: not pooled.
MIN_POOLED_BYTES = 16 * 1024


def _first_refcount(bucket: list) -> int:
    for arr in bucket:  # same shape of code as BufferPool._idle_in, so the counts compare
        return sys.getrefcount(arr)
    return 0


class BufferPool:
    """Byte buffers by size, reused once nothing else references them. One thread at a time."""

    def __init__(self, max_per_size: int = 16) -> None:
        self.max_per_size = max_per_size
        self._by_size: dict[int, list[np.ndarray]] = {}
        self.allocations = 0  # pooled-size buffers allocated so far (flat once warmed up)
        self.reuses = 0
        # The count of an array referenced only by the pool, measured rather than assumed (it
        # differs between Python versions: 3.14 borrows some stack references).
        self._idle_refs = _first_refcount([np.empty(1, dtype=np.uint8)])

    def take(self, nbytes: int) -> memoryview:
        """A writable buffer of exactly ``nbytes`` bytes; its contents are garbage."""
        if nbytes < MIN_POOLED_BYTES:
            return memoryview(np.empty(nbytes, dtype=np.uint8))
        # Sizes vary from step to step (T is the batch's longest example): pool by power-of-two
        # capacity and hand out a prefix (the slice keeps the array referenced like the whole).
        capacity = 1 << (nbytes - 1).bit_length()
        bucket = self._by_size.setdefault(capacity, [])
        arr = self._idle_in(bucket)
        if arr is not None:
            self.reuses += 1
            return memoryview(arr)[:nbytes]
        arr = np.empty(capacity, dtype=np.uint8)  # uninitialised: the cipher overwrites every byte
        self.allocations += 1
        if len(bucket) < self.max_per_size:
            bucket.append(arr)
        return memoryview(arr)[:nbytes]

    def _idle_in(self, bucket: list) -> np.ndarray | None:
        for arr in bucket:
            if sys.getrefcount(arr) <= self._idle_refs:
                return arr
        return None
