"""Client-batch window at the broker: when a step's trunk batch leaves, and who is a straggler."""

from __future__ import annotations

from broker.batch_window import BatchWindow
from shared.wire.protocol import Reason

SILOS = ["a", "b", "c"]


def _window(**kw) -> BatchWindow:
    w = BatchWindow(SILOS, window_s=kw.pop("window_s", 1.0), start_barrier_s=kw.pop("barrier", 0.0), **kw)
    for s in SILOS:
        w.silo_registered(s)
    return w


def test_batch_leaves_when_every_active_silo_is_in():
    w = _window()
    assert w.submit("a", 0, "fa") is None and w.submit("b", 0, "fb") is None
    assert w.ready() == []
    assert w.submit("c", 0, "fc") is None
    (batch,) = w.ready()
    assert batch.step == 0 and batch.members == {"a": "fa", "b": "fb", "c": "fc"}
    assert w.waiting == 0


def test_window_expiry_makes_late_silos_stragglers_for_that_step_only():
    w = _window(window_s=0.5)
    w.submit("a", 0, "fa")
    w.submit("b", 0, "fb")
    opened = w.open[0].opened_at
    assert w.ready(now=opened + 0.1) == []
    (batch,) = w.ready(now=opened + 0.6)
    assert set(batch.members) == {"a", "b"}
    reason = w.submit("c", 0, "late")
    assert reason is not None and reason.code == Reason.STRAGGLER
    assert w.submit("c", 1, "fc1") is None  # rejoins at the next step


def test_left_silos_are_not_awaited():
    w = _window()
    w.silo_done("c")
    w.submit("a", 0, 1)
    w.submit("b", 0, 2)
    assert len(w.ready()) == 1


def test_max_silos_splits_a_step_into_several_batches():
    w = _window(max_silos=2)
    for s in SILOS:
        assert w.submit(s, 0, s) is None
    first, second = w.ready()
    assert set(first.members) == {"a", "b"} and set(second.members) == {"c"}


def test_steps_leave_in_order_and_duplicates_are_refused():
    w = _window()
    for s in SILOS:
        w.submit(s, 1, s)  # step 1 complete, but step 0 still open: nothing may overtake it
    w.submit("a", 0, "a0")
    assert w.ready(now=w.open[0].opened_at + 0.1) == []
    assert w.submit("a", 0, "again") is not None
    w.submit("b", 0, "b0")
    w.submit("c", 0, "c0")
    assert [b.step for b in w.ready()] == [0, 1]
    assert w.submit("a", 1, "again").code == Reason.DUPLICATE


def test_start_barrier_holds_the_window_until_every_silo_registered():
    w = BatchWindow(SILOS, window_s=0.01, start_barrier_s=60.0)
    w.silo_registered("a")
    w.submit("a", 0, "fa")
    assert w.ready(now=w.open[0].opened_at + 1.0) == []  # b and c are still starting
    w.silo_registered("b")
    w.silo_registered("c")
    assert len(w.ready(now=w.open[0].opened_at + 1.0)) == 1


# ---------------------------------------------------------------- micro-batches (pieces of a step)


def test_each_silos_kth_piece_goes_into_the_steps_kth_batch():
    w = _window()
    # a: 3 pieces, b: 2, c: 1 (a silo flags every piece but its last "more": last=False)
    assert w.submit("a", 0, "a0", last=False) is None
    assert w.submit("b", 0, "b0", last=False) is None
    assert w.submit("a", 0, "a1", last=False) is None
    assert w.submit("c", 0, "c0") is None
    (first,) = w.ready()
    assert (first.step, first.piece, first.members) == (0, 0, {"a": "a0", "b": "b0", "c": "c0"})
    assert w.ready() == []  # piece 1 still waits for b (c has sent its last piece: not awaited)
    assert w.submit("b", 0, "b1") is None
    (second,) = w.ready()
    assert (second.piece, second.members) == (1, {"a": "a1", "b": "b1"})
    assert w.submit("a", 0, "a2") is None
    (third,) = w.ready()  # only a has a third piece: nobody else is awaited
    assert (third.piece, third.members) == (2, {"a": "a2"})


def test_pieces_leave_in_order_and_a_piece_after_the_last_is_a_duplicate():
    w = _window()
    for s in SILOS:
        w.submit(s, 0, f"{s}0", last=False)
    for s in ("a", "b"):
        w.submit(s, 0, f"{s}1")
    assert [b.piece for b in w.ready()] == [0]  # piece 1 waits for c's
    assert w.submit("a", 0, "extra").code == Reason.DUPLICATE
    w.submit("c", 0, "c1")
    assert [b.piece for b in w.ready()] == [1]
    assert w.submit("c", 0, "again").code == Reason.DUPLICATE


def test_a_late_piece_makes_the_silo_a_straggler_for_the_rest_of_the_step():
    w = _window(window_s=0.5)
    for s in SILOS:
        w.submit(s, 0, f"{s}0", last=False)
    w.ready()
    w.submit("a", 0, "a1")
    w.submit("b", 0, "b1")
    (batch,) = w.ready(now=w.open[0].opened_at + 0.6)
    assert batch.piece == 1 and set(batch.members) == {"a", "b"}
    assert w.submit("c", 0, "c1").code == Reason.STRAGGLER
    assert w.submit("c", 1, "c-next") is None


def test_a_step_sent_again_after_its_worker_died_is_accepted():
    w = _window()
    for s in SILOS:
        w.submit(s, 0, s)
    w.ready()
    w.forget("b")  # b's trunk worker died: b sends step 0 again
    assert w.submit("b", 0, "again") is None
    assert w.submit("a", 0, "again").code == Reason.DUPLICATE
