"""What a silo waits for, and what the broker or the trunk may answer instead.

The silo is request-reply: it sends a step's message and waits for the matching reply. While it
waits, the broker's heartbeats prove the broker alive and ours prove this connection alive; stale
or malformed frames are dropped (counted in the link), and an ERROR or ROLLBACK becomes the typed
exception its reason code names (silo_agent/peer_errors.py), which the training loop handles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from shared.runtime.settings import SiloSettings
from shared.state.run_config import ConfigMismatch
from shared.wire.peer_link import BrokerLink
from shared.wire.protocol import ErrorReason, Kind, Reason
from shared.wire.wire import Message
from silo_agent.peer_errors import IdentityTaken, PeerError, Reregister, Retry, Rollback, Straggler

log = logging.getLogger("silo")


class SiloReplies:
    def __init__(self, link: BrokerLink, settings: SiloSettings) -> None:
        self.link, self.settings = link, settings

    def await_reply(self, kind: Kind, step: int) -> Message:
        """Wait for ``kind`` of ``step``; stale or malformed replies are dropped, ERROR raises."""
        return self.await_match(lambda m: m.kind == kind and (kind == Kind.READY or m.step == step),
                                f"{kind.name} for step {step}", step)

    def await_match(self, wanted: Callable[[Message], bool], what: str, step: int | None = None) -> Message:
        s = self.settings
        deadline = time.monotonic() + s.step_timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise PeerError(f"no {what} within {s.step_timeout_s:.0f}s "
                                f"(is the broker at {s.broker_frontend} up, with a trunk worker?)")
            if not self.link.wait(min(left_ms, int(self.link.liveness.interval_s * 1000))):
                self.link.heartbeat()  # waiting for our turn: tell the broker this connection is alive
                continue
            msg = self.link.decode(self.link.receive())
            if msg is None or msg.kind == Kind.HEARTBEAT:  # refused (counted), or the broker's beat
                continue
            if msg.kind == Kind.ROLLBACK:
                raise Rollback(msg.text)
            if msg.kind == Kind.ERROR:
                if _stale_straggler(msg, step):
                    # client-batch with micro-batches: a trunk batch of a step we already skipped
                    # went on without us; that step is over here
                    log.info("dropped a straggler notice for step %d, already skipped", msg.step)
                    continue
                raise _error_of(msg, step)
            if wanted(msg):
                return msg
            log.warning("dropped unexpected %s (round %d step %d) while waiting for %s", msg.kind.name, msg.round,
                        msg.step, what)


def _stale_straggler(msg: Message, step: int | None) -> bool:
    error = ErrorReason.from_text(msg.text)
    return error.code == Reason.STRAGGLER and step is not None and msg.step < step


def _error_of(msg: Message, step: int | None) -> Exception:
    """The exception an ERROR's reason code stands for (a refusal of this step unless typed)."""
    error = ErrorReason.from_text(msg.text)
    if error.code == Reason.CONFIG_MISMATCH:  # the broker or the trunk: our settings differ
        return ConfigMismatch(f"config mismatch with the run: {error.detail}")
    if error.code == Reason.REGISTER:
        return Reregister(msg.text)
    if error.code == Reason.IDENTITY_TAKEN:
        return IdentityTaken(f"step {msg.step} refused: {msg.text}")
    if error.code == Reason.STRAGGLER and msg.step == step:
        return Straggler(msg.text)
    if error.code == Reason.RETRY and step is not None:
        return Retry(msg.text)
    return PeerError(f"step {msg.step} refused: {msg.text}")
