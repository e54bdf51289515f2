"""What the broker or the trunk can answer a silo instead of the reply it waits for.

Each is raised from the silo's receive loop and handled by its training loop (silo_agent/agent.py).
"""

from __future__ import annotations

from shared.wire.control_text import ResumePoint


class PeerError(RuntimeError):
    """The broker or trunk refused a step or stopped answering."""


class Rollback(RuntimeError):
    """A role restarted: go back to the end of round ``round`` (its checkpoint) and go on from there."""

    def __init__(self, text: str | None) -> None:
        super().__init__(f"the broker asks to resume from round {text}")
        self.round = resume_round(text)


class IdentityTaken(PeerError):
    """The broker holds this silo id on another connection that is still alive (our previous process's)."""


class Reregister(RuntimeError):
    """The broker does not know this connection (it restarted): register again."""


def resume_round(text: str | None) -> int:
    """The round to resume from in a READY ack or ROLLBACK ("resume=R"; -1 = before the first)."""
    try:
        return ResumePoint.from_text(text).round
    except ValueError as exc:
        raise PeerError(f"{exc} from the broker") from None


class Retry(RuntimeError):
    """The broker lost the trunk worker holding this step (nothing was applied): send it again."""


class Straggler(RuntimeError):
    """Client-batch: this silo's slice was dropped from its step's trunk batch (it came late)."""
