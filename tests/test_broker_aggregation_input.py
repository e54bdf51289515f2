"""Aggregation messages with a malformed typed text (shared/wire/control_text.py AggJoin/AggAttempt)
reach a live broker on real sockets and real Redis: each is refused with a typed ERROR, counted,
and the broker keeps serving the silo that sent it."""

from __future__ import annotations

import threading
import time

import torch
import zmq

from broker.broker import Broker
from shared.runtime.settings import BrokerSettings
from shared.state.registry import Registry
from shared.wire.control_text import AggJoin
from shared.wire.protocol import ErrorReason, Kind
from shared.wire.wire import Message, message_from_wire, message_to_wire
from tests.conftest import REDIS_URL
from tests.test_processes import _free_port

RUN = "aggtext"


def _recv_kind(sock: zmq.Socket, kind: Kind, timeout_s: float = 10.0) -> Message:
    """The next message of ``kind`` (the broker's heartbeats in between are skipped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            msg = message_from_wire(sock.recv_multipart())
            if msg.kind == kind:
                return msg
    raise AssertionError(f"no {kind.name} from the broker")


def test_malformed_aggregation_texts_are_refused_and_the_broker_serves_on(redis_prefix):
    registry = Registry(REDIS_URL, redis_prefix, RUN)
    registry.create_run({"mode": "serial", "silos": "silo0", "local_steps": 1})
    front, back = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    settings = BrokerSettings(redis_url=REDIS_URL, key_prefix=redis_prefix, run_id=RUN, frontend_bind=front,
                              backend_bind=back, encryption=False)
    broker = Broker(settings, registry, ["silo0"], 1)
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    silo = zmq.Context.instance().socket(zmq.DEALER)
    silo.setsockopt(zmq.LINGER, 0)
    silo.setsockopt(zmq.IDENTITY, b"silo0")
    silo.connect(front)
    try:
        silo.send_multipart(message_to_wire(Message(Kind.READY, RUN, "silo0")))
        assert _recv_kind(silo, Kind.READY).text == "resume=-1"

        vector = torch.arange(4, dtype=torch.int64)
        bad = [
            Message(Kind.AGG_JOIN, RUN, "silo0", 0),  # no weight at all (the old wire put it in seq)
            Message(Kind.AGG_JOIN, RUN, "silo0", 0, text="weight=-3"),
            Message(Kind.AGG_JOIN, RUN, "silo0", 0, text=f"weight={2**62 + 1}"),
            Message(Kind.AGG_UPLOAD, RUN, "silo0", 0, tensors=[vector]),  # no attempt
            Message(Kind.AGG_UPLOAD, RUN, "silo0", 0, text="attempt=x", tensors=[vector]),
        ]
        for msg in bad:
            silo.send_multipart(message_to_wire(msg))
            error = ErrorReason.from_text(_recv_kind(silo, Kind.ERROR).text)
            assert error.name == "aggregation" and error.code is None  # counted, not acted on
            assert "weight" in error.detail or "attempt" in error.detail

        # still serving: a well-formed join of the only silo closes the round (nothing to average)
        silo.send_multipart(message_to_wire(Message(Kind.AGG_JOIN, RUN, "silo0", 0, text=AggJoin(16).to_text())))
        closed = _recv_kind(silo, Kind.ROUND_CLOSED)
        assert closed.round == 0
        assert thread.is_alive()

        deadline = time.monotonic() + 10
        while registry.rejected().get("aggregation", 0) < len(bad):  # counters reach Redis in the background
            assert time.monotonic() < deadline, registry.rejected()
            time.sleep(0.1)
    finally:
        silo.close()
        broker.stop()
        thread.join(timeout=10)
    assert not thread.is_alive()
