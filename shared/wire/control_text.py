"""The structured values that control messages carry in their text field, one type each.

Each type has a mirrored pair, ``to_text()`` and ``from_text()``, the only code that writes or
reads its text: the roles hand these objects around, never the strings (tests/test_control_text.py
round-trips every one). The wire itself is unchanged (shared/wire/protocol.py documents each kind's text).

* ``ResumePoint``  READY's ack ("resume=R") and ROLLBACK ("R"): the round to go on from.
* ``PeerIntro``    a peer's READY: "incarnation=<hex>" and the run-config claim line.
* ``RoundEnd``     ROUND_END (broker -> trunk, hierarchical): "w0,w1;silo0:100,silo1:80".
* ``AggJoin``      AGG_JOIN (silo -> broker): "weight=N", the silo's FedAvg weight (sample count).
* ``AggStart``     AGG_START (broker -> silo): "attempt=K;silo0,silo1", the attempt and its participants.
* ``AggAttempt``   AGG_UPLOAD (silo -> broker) and AGG_RESULT (broker -> silo): "attempt=K".
* ``SiloReport``   PROGRESS (silo -> broker): JSON of the fields `splitfed status` shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from shared.wire.wire import FrameError

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


MAX_AGG_WEIGHT = 2**62  # a sample count; the upload's int64 fixed point multiplies by it (secure_agg)
MAX_ATTEMPT = 2**31 - 1


def _counted(text: str | None, prefix: str, limit: int, what: str) -> int:
    """The integer N of "<prefix>N", 0 <= N <= limit; ValueError otherwise (the caller refuses)."""
    if not text or not text.startswith(prefix) or not text[len(prefix):].isdigit():
        raise ValueError(f"bad {what} {text!r} (expected {prefix}N)")
    value = int(text[len(prefix):])
    if value > limit:
        raise ValueError(f"{what} {value} is over {limit}")
    return value


@dataclass(frozen=True)
class AggJoin:
    """A silo's round is done; its FedAvg weight (its sample count, public like `samples` in Redis)."""

    weight: int

    def to_text(self) -> str:
        return f"weight={self.weight}"

    @classmethod
    def from_text(cls, text: str | None) -> AggJoin:
        return cls(_counted(text, "weight=", MAX_AGG_WEIGHT, "aggregation weight"))


@dataclass(frozen=True)
class AggAttempt:
    """Which aggregation attempt of the round an upload or a result belongs to (a new attempt
    starts whenever a participant drops before the commit point)."""

    attempt: int

    def to_text(self) -> str:
        return f"attempt={self.attempt}"

    @classmethod
    def from_text(cls, text: str | None) -> AggAttempt:
        return cls(_counted(text, "attempt=", MAX_ATTEMPT, "aggregation attempt"))


@dataclass(frozen=True)
class AggStart:
    """An aggregation attempt: its number and the silos whose masked uploads make its sum."""

    attempt: int
    participants: tuple[str, ...]

    def to_text(self) -> str:
        return f"{AggAttempt(self.attempt).to_text()};{','.join(self.participants)}"

    @classmethod
    def from_text(cls, text: str | None) -> AggStart:
        attempt, sep, listed = (text or "").partition(";")
        if not sep:
            raise ValueError(f"bad AGG_START text {text!r} (expected attempt=K;silo,...)")
        return cls(AggAttempt.from_text(attempt).attempt, tuple(p for p in listed.split(",") if p))


# What a silo may report, and what each may hold: the broker writes these into the silo's Redis
# hash, so nothing else gets in (no field can shadow another role's, no value is unbounded).
REPORT_FIELDS = {"samples": int, "steps": int, "pid": int, "host": str, "round": int, "step": int,
                 "loss": str, "updated_at": str, "status": str}
REPORT_STATUSES = ("joined", "finished", "failed")
MAX_REPORT_VALUE = 128
MAX_REJECTED_REASONS = 32


@dataclass(frozen=True)
class SiloReport:
    """A silo's progress for the broker to record: ``fields`` for its Redis hash, ``rejected``
    (reason -> count) for the run's rejected-frame counters."""

    fields: dict = field(default_factory=dict)
    rejected: dict = field(default_factory=dict)

    def to_text(self) -> str:
        return json.dumps({"fields": self.fields, "rejected": self.rejected}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_text(cls, text: str | None) -> SiloReport:
        """ValueError unless it is exactly a report of known fields with bounded values."""
        try:
            doc = json.loads(text or "")
        except json.JSONDecodeError:
            raise ValueError("a silo report is JSON") from None
        if not isinstance(doc, dict) or set(doc) - {"fields", "rejected"}:
            raise ValueError("a silo report holds 'fields' and 'rejected' only")
        fields, rejected = doc.get("fields", {}), doc.get("rejected", {})
        if not isinstance(fields, dict) or not isinstance(rejected, dict):
            raise ValueError("a silo report's fields and rejected are objects")
        for name, value in fields.items():
            kind = REPORT_FIELDS.get(name)
            if kind is None or type(value) is not kind or len(str(value)) > MAX_REPORT_VALUE:
                raise ValueError(f"silo report field {name!r}={value!r} is not allowed")
        if fields.get("status", "joined") not in REPORT_STATUSES:
            raise ValueError(f"silo report status {fields['status']!r}")
        if len(rejected) > MAX_REJECTED_REASONS or not all(
                isinstance(r, str) and 0 < len(r) <= 32 and type(n) is int and 0 < n < 2**31 for r, n in rejected.items()):
            raise ValueError("silo report rejected counts: up to 32 reasons, each a short name and a count")
        return cls(fields, rejected)
