"""A silo's view of whether the broker is alive (the Paranoid Pirate pattern of the ZeroMQ guide)."""

from __future__ import annotations

import logging

from shared.wire.protocol import BROKER_LIVENESS
from silo_agent.peer_errors import PeerError

log = logging.getLogger("silo")

class BrokerLiveness:
    """The broker heartbeats every registered silo. Silence is counted only while this silo waits on
    its socket (not while it computes, when the broker's frames just queue up): after
    ``BROKER_LIVENESS`` silent heartbeats the silo says the broker is down and heartbeats at a
    doubling interval (ZeroMQ reconnects underneath with its own back-off, and a restarted broker
    answers with "register"); past ``timeout_s`` of silence it gives up."""

    def __init__(self, heartbeat_s: float, timeout_s: float, address: str) -> None:
        self.heartbeat_s, self.timeout_s, self.address = heartbeat_s, timeout_s, address
        self.interval_s = heartbeat_s
        self.silent_s = 0.0
        self.down = False

    def heard(self) -> None:
        if self.down:
            log.warning("the broker answers again after %.1fs of silence", self.silent_s)
        self.silent_s, self.interval_s, self.down = 0.0, self.heartbeat_s, False

    def silent_for(self, seconds: float) -> None:
        self.silent_s += seconds
        if not self.down and self.silent_s >= BROKER_LIVENESS * self.heartbeat_s:
            self.down = True
            log.warning("the broker at %s has been silent for %.1fs (%d heartbeats): it looks down; waiting "
                        "for it (giving up after %.0fs of silence)", self.address, self.silent_s, BROKER_LIVENESS,
                        self.timeout_s, extra={"reason": "broker_silent"})
        if self.down:
            self.interval_s = min(self.interval_s * 2, 8 * self.heartbeat_s)
        if self.silent_s >= self.timeout_s:
            raise PeerError(f"the broker at {self.address} has been silent for {self.silent_s:.0f}s "
                            f"(broker_timeout_s={self.timeout_s:.0f}): giving up")
