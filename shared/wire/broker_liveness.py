"""A peer's view of whether the broker is alive (the Paranoid Pirate pattern of the ZeroMQ guide).

Silos and trunk workers both hear the broker's heartbeat every ``heartbeat_s``. Silence is counted
only while the peer waits on its socket (not while it computes, when the broker's frames just queue
up): after ``BROKER_LIVENESS`` silent heartbeats the peer says the broker looks down and heartbeats
at a doubling interval (ZeroMQ reconnects underneath with its own back-off, and a restarted broker
answers with "register"). A silo gives up past ``timeout_s`` of silence (its step cannot finish
without the broker); a trunk worker waits for as long as it takes (``timeout_s=None``): it serves
whoever comes back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from shared.wire.protocol import BROKER_LIVENESS

log = logging.getLogger("link")


class BrokerLiveness:
    def __init__(self, heartbeat_s: float, timeout_s: float | None, address: str,
                 give_up: Callable[[str], Exception] = ConnectionError) -> None:
        self.heartbeat_s, self.timeout_s, self.address = heartbeat_s, timeout_s, address
        self.give_up = give_up  # the role's own error type, so each role handles it its own way
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
            patience = "waiting for it" if self.timeout_s is None else f"giving up after {self.timeout_s:.0f}s of silence"
            log.warning("the broker at %s has been silent for %.1fs (%d heartbeats): it looks down; %s",
                        self.address, self.silent_s, BROKER_LIVENESS, patience, extra={"reason": "broker_silent"})
        if self.down:
            self.interval_s = min(self.interval_s * 2, 8 * self.heartbeat_s)
        if self.timeout_s is not None and self.silent_s >= self.timeout_s:
            raise self.give_up(f"the broker at {self.address} has been silent for {self.silent_s:.0f}s "
                               f"(broker_timeout_s={self.timeout_s:.0f}): giving up")
