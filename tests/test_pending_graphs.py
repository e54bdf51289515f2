"""The trunk's open forward graphs: first in first out per step, the last one of a step flagged."""

from trunk_worker.pending_graphs import PendingGraphs


def test_micro_batches_of_a_step_come_back_in_order_and_the_last_is_flagged():
    p = PendingGraphs(max_pending=8)
    p.add(("s", 0), "g0")
    p.add(("s", 0), "g1")
    assert len(p) == 2 and ("s", 0) in p
    assert p.first(("s", 0)) == "g0"
    assert p.pop(("s", 0)) == ("g0", False)
    assert p.pop(("s", 0)) == ("g1", True)
    assert ("s", 0) not in p and len(p) == 0


def test_the_oldest_graphs_are_dropped_beyond_the_bound():
    p = PendingGraphs(max_pending=2)
    assert p.add(("a", 0), 1) == []
    assert p.add(("a", 0), 2) == []
    assert p.add(("b", 0), 3) == [("a", 0)]
    assert p.pop(("a", 0)) == (2, True)
    assert p.pop(("b", 0)) == (3, True)
