"""What the trunk refuses to serve: a well-formed message it cannot act on (counted under ``reason``)."""

from __future__ import annotations


class StepError(Exception):
    """A well-formed message that cannot be served (no open step, wrong hidden size...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
