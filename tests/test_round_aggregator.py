"""The broker's round aggregation state machine, driven message by message."""

from __future__ import annotations

import torch

from broker.rounds import RoundAggregator
from shared.wire.protocol import Kind


class Outbox:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []
        self.committed: list[int] = []
        self.trunk_rounds: list[int] = []

    def send(self, silo, msg):
        self.sent.append((silo, msg))

    def take(self, kind):
        out = [(s, m) for s, m in self.sent if m.kind == kind]
        self.sent = [(s, m) for s, m in self.sent if m.kind != kind]
        return out


def _agg(trunk: bool = False, timeout_s: float = 60.0):
    box = Outbox()

    def start_trunk(rnd, weights):
        box.trunk_rounds.append(rnd)
        return trunk

    return RoundAggregator("r", timeout_s, box.send, start_trunk, box.committed.append), box


def _vec(x: int) -> torch.Tensor:
    return torch.tensor([x, x, 1], dtype=torch.int64)


def test_full_round_sums_uploads_and_commits():
    agg, box = _agg()
    active = {"a", "b"}
    agg.join("a", 0, 10, active)
    assert box.take(Kind.AGG_START) == []
    agg.join("b", 0, 20, active)
    starts = box.take(Kind.AGG_START)
    assert sorted(s for s, _ in starts) == ["a", "b"] and all(m.text == "attempt=0;a,b" and m.seq == 0 for _, m in starts)
    assert agg.upload("a", 0, 0, _vec(3)) is None
    assert box.take(Kind.AGG_RESULT) == []
    assert agg.upload("b", 0, 0, _vec(4)) is None
    results = box.take(Kind.AGG_RESULT)
    assert len(results) == 2 and all(m.tensors[0].tolist() == [7, 7, 2] and m.text == "attempt=0" for _, m in results)
    agg.checkpointed("a", 0)
    assert box.committed == []  # committed only once every silo holds a checkpoint of the round
    agg.checkpointed("b", 0)
    assert box.committed == [0]


def test_drop_before_commit_starts_a_new_attempt_without_the_dropped_silo():
    agg, box = _agg()
    for s in "abc":
        agg.join(s, 0, 1, {"a", "b", "c"})
    box.take(Kind.AGG_START)
    agg.upload("a", 0, 0, _vec(1))
    agg.drop("c", "went silent")
    starts = box.take(Kind.AGG_START)
    assert sorted(s for s, _ in starts) == ["a", "b"] and all(m.text == "attempt=1;a,b" for _, m in starts)
    assert agg.upload("b", 0, 0, _vec(2)) is not None  # the old attempt's upload is refused
    agg.upload("a", 0, 1, _vec(1))
    agg.upload("b", 0, 1, _vec(2))
    assert [m.tensors[0].tolist() for _, m in box.take(Kind.AGG_RESULT)] == [[3, 3, 2]] * 2


def test_timeout_excludes_the_absent_and_a_late_joiner_is_alone():
    agg, box = _agg(timeout_s=0.0)
    agg.join("a", 0, 1, {"a", "b", "c"})  # timed out at once: fixed without b and c
    assert box.take(Kind.AGG_START) == []  # a single participant: nothing to aggregate
    assert [s for s, _ in box.take(Kind.ROUND_CLOSED)] == ["a"]
    agg.join("b", 0, 1, {"a", "b", "c"})
    (late,) = box.take(Kind.ROUND_CLOSED)
    assert late[0] == "b" and late[1].text == "late"
    agg.checkpointed("a", 0)
    assert box.committed == [0]


def test_trunk_sync_gates_the_result():
    agg, box = _agg(trunk=True)
    agg.join("a", 0, 1, {"a", "b"})
    agg.join("b", 0, 1, {"a", "b"})
    assert box.trunk_rounds == [0]
    agg.upload("a", 0, 0, _vec(1))
    agg.upload("b", 0, 0, _vec(2))
    assert box.take(Kind.AGG_RESULT) == []  # the trunk workers have not averaged and checkpointed yet
    agg.trunk_done(0)
    assert len(box.take(Kind.AGG_RESULT)) == 2


def test_an_upload_of_another_size_excludes_its_sender():
    agg, box = _agg()
    for s in "abc":
        agg.join(s, 0, 1, {"a", "b", "c"})
    box.take(Kind.AGG_START)
    agg.upload("a", 0, 0, _vec(1))
    assert agg.upload("b", 0, 0, torch.zeros(5, dtype=torch.int64)) is not None
    assert [m.text for _, m in box.take(Kind.AGG_START)] == ["attempt=1;a,c", "attempt=1;a,c"]


def test_without_aggregation_the_round_still_closes_and_commits():
    box = Outbox()
    agg = RoundAggregator("r", 60.0, box.send, lambda r, w: False, box.committed.append, aggregate=False)
    agg.join("a", 0, 1, {"a", "b"})
    agg.join("b", 0, 1, {"a", "b"})
    assert box.take(Kind.AGG_START) == []
    assert sorted(s for s, _ in box.take(Kind.ROUND_CLOSED)) == ["a", "b"]
    agg.checkpointed("a", 0)
    agg.drop("b", "crashed before its checkpoint")  # a silo that is gone does not hold the commit up
    assert box.committed == [0]
