"""Serial turn-taking: one step per silo, round-robin, in a fixed order; leavers are skipped."""

from broker.serial import SerialScheduler


def drain(s: SerialScheduler) -> list[str]:
    order = []
    while (d := s.next_dispatch()) is not None:
        silo, _ = d
        order.append(silo)
        s.step_finished(silo)
    return order


def test_round_robin_regardless_of_arrival_order():
    s = SerialScheduler(["a", "b", "c"])
    for silo in ["c", "c", "b", "a", "b", "a"]:  # arrival order differs from turn order
        s.submit(silo, object())
    assert drain(s) == ["a", "b", "c", "a", "b", "c"]


def test_waits_for_the_silo_whose_turn_it_is():
    s = SerialScheduler(["a", "b"])
    s.submit("b", 1)
    assert s.next_dispatch() is None  # a goes first, even if b is early
    s.submit("a", 2)
    assert s.next_dispatch() == ("a", 2)


def test_one_step_in_flight():
    s = SerialScheduler(["a", "b"])
    s.submit("a", 1)
    s.submit("b", 2)
    assert s.next_dispatch() == ("a", 1)
    assert s.next_dispatch() is None
    s.step_finished("a")
    assert s.next_dispatch() == ("b", 2)


def test_finished_silos_are_skipped():
    s = SerialScheduler(["a", "b", "c"])
    s.silo_done("b")
    for silo in ["a", "c", "a", "c"]:
        s.submit(silo, None)
    assert drain(s) == ["a", "c", "a", "c"]
    s.silo_done("a")
    s.silo_done("c")
    assert s.finished


def test_leaving_during_own_turn_frees_the_turn():
    s = SerialScheduler(["a", "b"])
    s.submit("a", 1)
    s.submit("b", 2)
    assert s.next_dispatch() == ("a", 1)
    s.silo_done("a")
    assert s.next_dispatch() == ("b", 2)


def test_a_turn_holds_all_micro_batches_of_its_step():
    s = SerialScheduler(["a", "b"])
    s.submit("a", "a0.0", step=0)
    s.submit("b", "b0.0", step=0)
    assert s.next_dispatch() == ("a", "a0.0")
    s.submit("a", "a0.1", step=0)  # the step's next micro-batch is dispatched at once
    assert s.next_dispatch() == ("a", "a0.1")
    s.submit("a", "a1.0", step=1)  # a's next step waits for the next turn
    assert s.next_dispatch() is None
    assert s.step_finished("a", whole_turn=False) is False  # one micro-batch answered, one open
    assert s.next_dispatch() is None
    assert s.step_finished("a", whole_turn=False) is True
    assert s.next_dispatch() == ("b", "b0.0")
    assert s.step_finished("b", whole_turn=True) is True
    assert s.next_dispatch() == ("a", "a1.0")
