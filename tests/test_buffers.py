"""Hot-path buffer reuse: a pooled buffer is handed out again only once nothing holds it, and the
sealed codec allocates no new payload buffers once warm -- without ever overwriting a tensor that
is still alive (an autograd graph, a frame ZeroMQ has not sent yet)."""

from __future__ import annotations

import gc

import torch

from shared.crypto import keys as keystore
from shared.wire.buffers import MIN_POOLED_BYTES, BufferPool
from shared.crypto.handshake import accept_hello, make_hello
from shared.wire.protocol import Kind
from shared.crypto.sealed_codec import SealedCodec
from shared.wire.wire import Message

N = MIN_POOLED_BYTES * 2


def test_buffer_is_reused_only_when_free():
    pool = BufferPool()
    first = pool.take(N)
    held = torch.frombuffer(first, dtype=torch.uint8)  # a tensor over it, like an opened activation
    del first
    second = pool.take(N)
    assert torch.frombuffer(second, dtype=torch.uint8).data_ptr() != held.data_ptr()
    del second
    gc.collect()
    assert pool.allocations == 2
    third = pool.take(N)  # the second is free again
    assert pool.allocations == 2 and pool.reuses == 1
    del held, third
    for _ in range(5):
        pool.take(N)  # each result dropped at once: always a free one
    assert pool.allocations == 2


def test_sizes_that_vary_per_step_share_a_buffer():
    pool = BufferPool()
    for n in (N, N - 1000, N - 7, N):  # e.g. the batch's sequence length changes from step to step
        assert pool.take(n).nbytes == n
    assert pool.allocations == 1


def test_small_buffers_are_not_pooled():
    pool = BufferPool()
    for _ in range(3):
        assert len(pool.take(100)) == 100
    assert pool.allocations == 0


def _sessions(tmp_path):
    silo = keystore.generate_silo_keys(tmp_path / "silo")
    trunk = keystore.generate_trunk_keys(tmp_path / "trunk")
    enrolled = keystore.EnrolledSilo("silo0", silo.identity_public, silo.x25519_public, "enrolled", 0.0)
    hello, pending = make_hello(silo, "silo0", "run1", 0)
    trunk_session = accept_hello(hello, trunk, lambda _: enrolled, "run1")
    silo_session = pending.complete_ack(trunk_session.ack(), trunk.fingerprint)
    silo_codec, trunk_codec = SealedCodec(2**26), SealedCodec(2**26)
    silo_codec.sessions.add(silo_session)
    trunk_codec.sessions.add(trunk_session)
    return silo_codec, trunk_codec


def test_sealed_codec_reuses_buffers_and_never_overwrites_a_live_tensor(tmp_path):
    silo, trunk = _sessions(tmp_path)
    shape = (2, 64, 256)  # 128 KiB of fp32: pooled
    kept = []
    for step in range(6):
        h = torch.full(shape, float(step))
        msg = Message(Kind.FORWARD_RESULT, "run1", "silo0", 0, step, tensors=[h])
        opened = silo.decode(trunk.encode(msg))
        if step < 2:
            kept.append(opened.tensors[0])  # like graphs still waiting for their BACKWARD
    warm = (trunk.allocations(), silo.allocations())
    for step in range(6, 12):
        h = torch.full(shape, float(step))
        opened = silo.decode(trunk.encode(Message(Kind.FORWARD_RESULT, "run1", "silo0", 0, step, tensors=[h])))
        assert torch.equal(opened.tensors[0], h)
    assert (trunk.allocations(), silo.allocations()) == warm  # nothing new once warm
    assert warm[1] >= 3  # the two kept tensors pinned their buffers: others were needed
    for step, t in enumerate(kept):
        assert torch.equal(t, torch.full(shape, float(step)))  # never overwritten
