"""The broker's per-mode schedules (broker/schedules.py), driven as the broker's loop drives them."""

from __future__ import annotations

import pytest

from broker.schedules import HierarchicalQueue, SerialTurns, StepRoutes, replay_membership, schedule_for
from shared.runtime.settings import BrokerSettings


class Sent:
    """The broker's send_step: records each dispatch and routes the step to its worker."""

    def __init__(self, routes: StepRoutes) -> None:
        self.routes = routes
        self.steps: list[tuple[str, list[str], object]] = []

    def __call__(self, worker: str, silos: list[str], frames: object) -> None:
        for silo in silos:
            self.routes.holder[silo] = worker
        self.steps.append((worker, silos, frames))


def _hierarchical(**kw) -> tuple[HierarchicalQueue, list[tuple[str, str]]]:
    recorded: list[tuple[str, str]] = []
    schedule = schedule_for(BrokerSettings(mode="hierarchical", **kw), ["a", "b", "c"],
                            lambda silo, w: recorded.append((silo, w)))
    assert isinstance(schedule, HierarchicalQueue)
    return schedule, recorded


def test_each_mode_gets_its_schedule_and_an_unknown_one_is_refused():
    assert type(schedule_for(BrokerSettings(mode="serial"), ["a"], print)).__name__ == "SerialTurns"
    assert type(schedule_for(BrokerSettings(mode="client-batch"), ["a"], print)).__name__ == "ClientBatches"
    settings = BrokerSettings(mode="serial").model_copy(update={"mode": "ring"})
    with pytest.raises(ValueError, match="unknown mode 'ring'"):
        schedule_for(settings, ["a"], print)


def test_hierarchical_holds_steps_past_max_inflight_per_worker_in_arrival_order():
    schedule, recorded = _hierarchical(max_inflight=1)
    routes = StepRoutes()
    send = Sent(routes)
    for silo in ("a", "b", "c"):
        assert schedule.submit(silo, 0, f"fwd-{silo}") is None
    schedule.dispatch(["w0", "w1"], routes, send)
    # a -> w0, b -> w1 (least loaded); c is assigned w0 but w0 already holds one open step
    assert [(w, s) for w, s, _ in send.steps] == [("w0", ["a"]), ("w1", ["b"])]
    assert schedule.waiting == 1 and recorded == [("a", "w0"), ("b", "w1"), ("c", "w0")]
    del routes.holder["a"]  # a's BACKWARD_RESULT went back
    assert schedule.result_routed("a", error=False)
    schedule.dispatch(["w0", "w1"], routes, send)
    assert send.steps[-1][:2] == ("w0", ["c"]) and schedule.waiting == 0


def test_hierarchical_moves_a_dead_workers_silos_and_averages_only_where_they_trained():
    schedule, recorded = _hierarchical()
    routes = StepRoutes()
    for silo in ("a", "b", "c"):
        schedule.submit(silo, 0, silo)
    schedule.dispatch(["w0", "w1"], routes, Sent(routes))
    assert schedule.home_worker("b") == "w1"
    assert schedule.averaging_workers({"a": 4, "c": 4}, ["w0", "w1"]) == ["w0"]
    assert schedule.worker_lost("w0", ["w1"]) == {"a", "c"}
    assert schedule.home_worker("a") == schedule.home_worker("c") == "w1"
    assert recorded[-2:] == [("a", "w1"), ("c", "w1")]
    schedule.reset()  # a rollback: queued steps go, the assignment stays
    assert schedule.waiting == 0 and schedule.home_worker("a") == "w1"


def test_personalized_hierarchical_runs_average_nothing():
    schedule, _ = _hierarchical(personalize=True)
    routes = StepRoutes()
    schedule.submit("a", 0, "a")
    schedule.dispatch(["w0"], routes, Sent(routes))
    assert schedule.averaging_workers({"a": 1}, ["w0"]) == []


def test_serial_turns_keep_a_steps_micro_batches_on_one_worker_and_skip_gone_silos():
    schedule = SerialTurns(["a", "b"])
    routes = StepRoutes()
    send = Sent(routes)
    for micro in ("a0", "a1"):
        schedule.submit("a", 0, micro)
    schedule.submit("b", 0, "b0")
    schedule.dispatch(["w0", "w1"], routes, send)
    assert [(w, f) for w, _, f in send.steps] == [("w0", "a0"), ("w0", "a1")]  # b waits for a's turn
    assert not schedule.result_routed("a", error=False)  # one of two micro-batches answered
    assert schedule.result_routed("a", error=False)
    del routes.holder["a"]
    schedule.dispatch(["w0", "w1"], routes, send)
    assert send.steps[-1][1:] == (["b"], "b0")
    replay_membership(schedule, registered=["a"], gone=["b"])
    assert schedule.waiting == 0
    refusal = None
    for i in range(100):
        refusal = refusal or schedule.submit("a", 1, i)
    assert refusal is not None and refusal.name == "queue_full"
