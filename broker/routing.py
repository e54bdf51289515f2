"""Sending and refusing: frames routed without blocking, replies, validation of every received header,
refusals counted in Redis and metrics and answered with a typed ERROR."""

from __future__ import annotations

import logging
import zmq
from redis import RedisError

from broker.peers import Worker
from shared.wire.protocol import ErrorReason, Kind, Reason
from shared.wire.wire import FrameError, Header, Message, message_to_wire, split_frames

log = logging.getLogger("broker")


class BrokerRouting:
    """Part of Broker (broker/broker.py): sends on both sockets, and what is refused."""

    def _send_to_silo(self, silo: str, msg: Message) -> None:
        identity = self.silo_identity.get(silo)
        if identity is not None:
            self._send(self.frontend, identity, msg)

    def _forward_to_worker(self, worker: Worker, frames: list) -> None:
        self._route(self.backend, worker.identity, frames)

    def _route(self, sock: zmq.Socket, identity: bytes, frames: list) -> None:
        try:
            # NOBLOCK: a peer that stops reading must never stall the broker for everyone else.
            sock.send_multipart([identity, *frames], copy=False, flags=zmq.NOBLOCK)
            self.stats["routed"] += 1
            self.metrics.sent(frames)
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or its queue is full (EAGAIN)
            log.warning("could not route to %r: %s", identity, exc)
            self.writes.count_rejected("unroutable")

    def _send(self, sock: zmq.Socket, identity: bytes, msg: Message) -> None:
        self._route(sock, identity, message_to_wire(msg))

    def _redis(self, what: str, fn, *args):
        """A Redis call off the hot path that must not take the broker down while Redis restarts."""
        try:
            return fn(*args)
        except RedisError as exc:
            log.warning("Redis unavailable (%s): %s", what, exc)
            return None

    def _parse(self, frames: list, peer: str, reply_socket: zmq.Socket | None, reply_to: bytes | None) -> Header | None:
        try:
            header, *_ = split_frames([f.buffer for f in frames], self.settings.max_tensor_bytes)
        except FrameError as exc:
            self.stats["rejected"] += 1
            self.writes.count_rejected(exc.reason)
            self.metrics.rejected(exc.reason)
            log.warning("rejected frame from %s: %s", peer, exc)
            return None
        if header.run_id != self.run_id:
            self._reject("wrong_run", f"run {header.run_id!r}, this broker serves {self.run_id!r}", reply_socket, reply_to, header)
            return None
        return header

    def _reject(self, reason: Reason | str, detail: str, sock: zmq.Socket | None, identity: bytes | None,
                header: Header) -> None:
        reason = ErrorReason.of(reason).name  # the code's value: counters and metrics are keyed by it
        self.stats["rejected"] += 1
        self.writes.count_rejected(reason)
        self.metrics.rejected(reason)
        log.warning("rejected %s from %s: %s", header.kind.name, header.silo_id, detail,
                    extra={"silo": header.silo_id, "round": header.round, "step": header.step, "reason": reason})
        if sock is not None and identity is not None:
            msg = Message(Kind.ERROR, self.run_id, header.silo_id, header.round, header.step,
                          text=ErrorReason.of(reason, detail).to_text())
            self._send(sock, identity, msg)
