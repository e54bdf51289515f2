"""The structured values that control messages carry in their text field, one type each.

Each type has a mirrored pair, ``to_text()`` and ``from_text()``, the only code that writes or
reads its text: the roles hand these objects around, never the strings (tests/test_control_text.py
round-trips every one). The wire itself is unchanged (shared/protocol.py documents each kind's text).

* ``ResumePoint``  READY's ack ("resume=R") and ROLLBACK ("R"): the round to go on from.
* ``PeerIntro``    a peer's READY: "incarnation=<hex>" and the run-config claim line.
* ``RoundEnd``     ROUND_END (broker -> trunk, hierarchical): "w0,w1;silo0:100,silo1:80".
* ``AggStart``     AGG_START (broker -> silo): the participants, comma-separated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.wire import FrameError

INCARNATION_PREFIX = "incarnation="
RESUME_PREFIX = "resume="


@dataclass(frozen=True)
class ResumePoint:
    """The round to resume from; -1 is the initial state, before the first round."""

    round: int

    def to_text(self) -> str:
        """READY's ack to a peer."""
        return f"{RESUME_PREFIX}{self.round}"

    def to_rollback_text(self) -> str:
        """A ROLLBACK's text: the bare round."""
        return str(self.round)

    @classmethod
    def from_text(cls, text: str | None) -> ResumePoint:
        """Either form (no text: -1). ValueError when it is not a round >= -1."""
        value = (text or "-1").split("=", 1)[-1]
        try:
            rnd = int(value)
        except ValueError:
            raise ValueError(f"bad resume point {text!r}") from None
        if rnd < -1:
            raise ValueError(f"bad resume point {text!r}")
        return cls(rnd)


@dataclass(frozen=True)
class PeerIntro:
    """What a peer's READY says of itself: this process's incarnation and its run-config claim.

    A restarted process has a new incarnation; the claim line is shared/run_config.claim_line's,
    parsed (and its digest checked) by shared/run_config.parse_claim."""

    incarnation: str
    claim: str = ""

    def to_text(self) -> str:
        return f"{INCARNATION_PREFIX}{self.incarnation}\n{self.claim}"

    @classmethod
    def from_text(cls, text: str | None) -> PeerIntro:
        # Lenient, as the broker always was: a first line without the prefix is the incarnation.
        first, _, rest = (text or "").partition("\n")
        return cls(first.removeprefix(INCARNATION_PREFIX), rest)


@dataclass(frozen=True)
class RoundEnd:
    """A hierarchical round's end: the workers whose partial sums make the average, and every
    participating silo's FedAvg weight (sample count)."""

    workers: tuple[str, ...]
    weights: dict[str, int] = field(default_factory=dict)

    def to_text(self) -> str:
        return ",".join(self.workers) + ";" + ",".join(f"{s}:{n}" for s, n in sorted(self.weights.items()))

    @classmethod
    def from_text(cls, text: str | None) -> RoundEnd:
        """FrameError("schema") when malformed, empty, or a weight is negative."""
        text = text or ""
        try:
            workers_part, weights_part = text.split(";")
            workers = tuple(w for w in workers_part.split(",") if w)
            weights = {s: int(n) for s, n in (kv.split(":") for kv in weights_part.split(",") if kv)}
        except ValueError as exc:
            raise FrameError("schema", f"bad ROUND_END text {text[:80]!r}") from exc
        if not workers or not weights or any(n < 0 for n in weights.values()):
            raise FrameError("schema", f"bad ROUND_END text {text[:80]!r}")
        return cls(workers, weights)


@dataclass(frozen=True)
class AggStart:
    """The silos whose masked uploads make this aggregation attempt's sum (the attempt is the seq)."""

    participants: tuple[str, ...]

    def to_text(self) -> str:
        return ",".join(self.participants)

    @classmethod
    def from_text(cls, text: str | None) -> AggStart:
        return cls(tuple(p for p in (text or "").split(",") if p))
