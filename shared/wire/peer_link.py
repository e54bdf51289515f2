"""A peer's one connection to the broker: the socket, the codec, heartbeats, READY, broker liveness.

Silo agents (on the broker's frontend) and trunk workers (on its backend) talk to the broker the
same way, so they share this object instead of each keeping a copy of the plumbing:

    link = BrokerLink(peer_id, run_id, address, codec, metrics, timeline, liveness, curve=...)
    link.register(incarnation, run_config)        # READY with the peer's intro and config claim
    link.send(msg)                                # encode (seal), send, count
    if link.wait(timeout_ms): frames = link.receive()   # counts silence toward the broker's liveness
    msg = link.decode(frames)                     # None when refused: counted, logged, dropped

What a reply MEANS (a silo's step result, a trunk's work) stays with the role.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import zmq

from shared.runtime.metrics import RoleMetrics
from shared.runtime.step_timeline import StepTimeline
from shared.state.run_config import claim_line
from shared.wire.broker_liveness import BrokerLiveness
from shared.wire.control_text import PeerIntro
from shared.wire.protocol import Kind
from shared.wire.transport import client_socket
from shared.wire.wire import FrameError, Message

log = logging.getLogger("link")


class BrokerLink:
    def __init__(self, peer_id: str, run_id: str, address: str, codec, metrics: RoleMetrics, timeline: StepTimeline,
                 liveness: BrokerLiveness, curve: bool = False, curve_cert: Path | None = None,
                 curve_broker_key: str | None = None) -> None:
        self.peer_id, self.run_id = peer_id, run_id
        self.codec, self.metrics, self.timeline, self.liveness = codec, metrics, timeline, liveness
        self.rejected: Counter[str] = Counter()  # frames refused since the role last reported them
        self.sock = client_socket(zmq.Context.instance(), peer_id, address, curve, curve_cert, curve_broker_key)

    def send(self, msg: Message) -> list:
        """Encode (seal) and send ``msg``; returns its frames (what crossed the wire, for byte counts)."""
        frames = self.codec.encode(msg)
        with self.timeline.io():
            self.sock.send_multipart(frames, copy=False)
        self.metrics.sent(frames)
        return frames

    def heartbeat(self) -> None:
        """Tell the broker this connection is alive (and learn, from its answer, if it forgot us)."""
        self.send(Message(Kind.HEARTBEAT, self.run_id, self.peer_id))

    def register(self, incarnation: str, run_config: dict, token: Sequence[bytes] = ()) -> None:
        """READY: who we are (a new ``incarnation`` means a restarted process) and the run config we
        claim; ``token`` carries a silo's signed registration."""
        tensors = [torch.frombuffer(bytearray(raw), dtype=torch.uint8) for raw in token]
        self.send(Message(Kind.READY, self.run_id, self.peer_id, tensors=tensors,
                          text=PeerIntro(incarnation, claim_line(run_config)).to_text()))

    def wait(self, timeout_ms: int, socket_time: bool = True) -> bool:
        """True when a message is waiting; time spent in silence counts toward the broker's liveness
        (which raises the role's give-up error past its timeout). ``socket_time``: the wait counts
        as the step's socket time (a silo waiting for its reply), not so for a trunk waiting for work."""
        waited = time.monotonic()
        with self.timeline.io() if socket_time else nullcontext():
            ready = bool(self.sock.poll(timeout_ms))
        if not ready:
            self.liveness.silent_for(time.monotonic() - waited)
        return ready

    def receive(self) -> list:
        """The waiting message's frames as buffers; anything from the broker proves it alive."""
        with self.timeline.io():
            frames = self.sock.recv_multipart(copy=False)
        self.liveness.heard()
        self.metrics.received(frames)
        return [f.buffer for f in frames]

    def count_rejected(self, exc: FrameError) -> None:
        self.rejected[exc.reason] += 1
        self.metrics.rejected(exc.reason)
        log.warning("rejected frame from the broker: %s", exc)

    def decode(self, frames: list) -> Message | None:
        """The message, or None when it is malformed or fails to open (counted and logged)."""
        try:
            return self.codec.decode(frames)
        except FrameError as exc:
            self.count_rejected(exc)
            return None

    def close(self, linger_ms: int = 0) -> None:
        self.sock.close(linger=linger_ms)
