"""Each recovery path, fast and deterministic: real broker, trunk workers and silo agents in threads
(tests/harness.py) over real Redis and real ZeroMQ, encryption on, a fault injected at one exact
point, and the real outcome checked: what was applied, how often, and who was told what.

The slow tier (test_recovery_processes.py, test_modes_processes.py) runs the same paths as whole
demos across processes; these run in seconds each.
"""

from __future__ import annotations

import math

import pytest
import torch

from shared.wire.protocol import Kind
from silo_agent.agent import Reregister, Rollback
from tests.conftest import REDIS_URL
from tests.harness import Cluster, ClusterConfig, tiny_model_dir, wait_for


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def cluster(tmp_path, redis_prefix, model_dir):
    made = []

    def make(**cfg) -> Cluster:
        c = Cluster(tmp_path / f"c{len(made)}", redis_prefix + f"-{len(made)}", REDIS_URL, model_dir, ClusterConfig(**cfg))
        made.append(c)
        return c.start()

    yield make
    failures = []
    for c in reversed(made):
        try:
            c.close()
        except AssertionError as exc:  # a role that died or hung: fail, after cleaning up the rest
            failures.append(exc)
        finally:
            keys = list(c.registry.redis.scan_iter(match=f"{c.prefix}:*", count=500))
            if keys:
                c.registry.redis.delete(*keys)
    if failures:
        raise failures[0]


def _steps(history) -> list[tuple[int, int]]:
    """(step, trunk update counter) of the steps that were applied."""
    return [(h["step"], h["trunk_seq"]) for h in history if not h.get("skipped")]


# ------------------------------------------------------------------------------------------ retry


def test_a_retried_step_is_applied_once(cluster):
    """The worker applies step 1 and then stalls before its BACKWARD_RESULT leaves: the broker
    purges it and tells the silo "retry". The silo sends the step again; the worker, back to life,
    answers the retried BACKWARD with the result it kept instead of applying the step twice."""
    c = cluster(mode="serial")
    gate = c.gate(Kind.BACKWARD_RESULT, step=1, at="send")
    silo = c.silo(0)
    assert silo.start() == 0
    silo.step(0)
    pending = silo.submit(silo.agent.train_step, 1)
    assert gate.wait_stopped() == "trunk0"
    worker = c.worker("trunk0")
    assert worker.updates == 2  # step 1 is applied; its result is what is held back
    wait_for(lambda: "trunk0" not in c.broker.workers, "the broker to purge the silent worker")
    wait_for(lambda: any(e["text"].startswith("retry") for e in silo.errors), 'the silo to be told "retry"')
    gate.release()  # it was only slow: its held result leaves late, its heartbeats resume
    loss = pending.result(30)

    assert math.isfinite(loss)
    assert worker.updates == 2, "the retried step was applied a second time"
    assert _steps(silo.history) == [(0, 1), (1, 2)]  # step 1 once, with the counter of its one update
    assert [r[3] for r in worker.kinds(Kind.BACKWARD)] == [0, 1, 1]  # the retry did reach the worker
    assert "trunk0" in c.broker.workers  # readmitted once its heartbeats came back
    assert math.isfinite(silo.step(2)) and _steps(silo.history)[-1] == (2, 3)  # and the run goes on


def _three_steps(c: Cluster, stall_step_1: bool) -> tuple[list[float], list[torch.Tensor]]:
    gate = c.gate(Kind.BACKWARD_RESULT, step=1, at="send") if stall_step_1 else None
    silo = c.silo(0)
    silo.start()
    silo.step(0)
    pending = silo.submit(silo.agent.train_step, 1)
    if gate is not None:
        gate.wait_stopped()
        wait_for(lambda: any(e["text"].startswith("retry") for e in silo.errors), 'the silo to be told "retry"')
        gate.release()
    pending.result(30)
    silo.step(2)
    return [h["loss"] for h in silo.history], [p.detach().clone() for p in silo.agent.trainable]


def test_a_retried_step_changes_nothing(cluster):
    """The retry of test_a_retried_step_is_applied_once, against the same run without the stall:
    the same losses and the same silo weights, bit for bit. (Before the trunk kept the applied
    step's FORWARD_RESULT, the retried FORWARD ran through the updated trunk: loss 5.3219 instead
    of 5.3992, silo weights off by 2e-3.)"""
    losses, weights = _three_steps(cluster(mode="serial"), stall_step_1=False)
    stalled_losses, stalled_weights = _three_steps(cluster(mode="serial"), stall_step_1=True)
    assert stalled_losses == losses
    assert all(torch.equal(a, b) for a, b in zip(stalled_weights, weights))


# ------------------------------------------------------------------------------------------ purge


@pytest.mark.parametrize("mode", ["serial", "client-batch", "hierarchical"])
def test_a_silent_worker_is_purged_and_its_step_succeeds_on_another(cluster, mode):
    """A worker stops dead holding a silo's open step (it got the BACKWARD, answers nothing, sends
    no heartbeat): after liveness_ttl_s the broker purges it, the silo is told "retry", and the
    step is served and applied once by the other worker."""
    c = cluster(mode=mode, workers=2)
    gate = c.gate(Kind.BACKWARD, step=0)
    silo = c.silo(0)
    silo.start()
    pending = silo.submit(silo.agent.train_step, 0)
    victim = gate.wait_stopped()
    survivor = next(w for w in ("trunk0", "trunk1") if w != victim)
    loss = pending.result(30)

    assert math.isfinite(loss)
    assert victim not in c.broker.workers and survivor in c.broker.workers
    retries = [e for e in silo.errors if e["text"].startswith("retry")]
    assert len(retries) == 1 and victim in retries[0]["text"] and retries[0]["step"] == 0
    assert c.worker(victim).updates == 0 and c.worker(survivor).updates == 1
    assert _steps(silo.history) == [(0, 1)]
    silo.step(1)
    assert _steps(silo.history) == [(0, 1), (1, 2)] and c.worker(survivor).updates == 2


# ------------------------------------------------------------------------------------------ stragglers


def test_a_late_silo_is_a_straggler_and_the_batch_goes_on_without_it(cluster):
    """Client-batch: silo1 sends step 1 after its batch window closed. The batch left with silo0
    alone (one trunk update from silo0's slice only); silo1 is told "straggler", skips that step
    and is back in the next batch."""
    c = cluster(mode="client-batch", silos=2, batch_window_ms=1000)
    s0, s1 = c.silo(0), c.silo(1)
    s0.start(), s1.start()
    both = [s0.submit(s0.agent.train_step, 0), s1.submit(s1.agent.train_step, 0)]
    [f.result(30) for f in both]
    s0.step(1)  # returns once the window has closed on a batch of silo0 alone
    assert math.isnan(s1.step(1))  # silo1's step 1: refused as a straggler, skipped
    both = [s0.submit(s0.agent.train_step, 2), s1.submit(s1.agent.train_step, 2)]
    [f.result(30) for f in both]

    worker = c.worker("trunk0")
    assert worker.bundles == [
        {"step": 0, "members": ["silo0", "silo1"], "gradients": ["silo0", "silo1"]},
        {"step": 1, "members": ["silo0"], "gradients": ["silo0"]},
        {"step": 2, "members": ["silo0", "silo1"], "gradients": ["silo0", "silo1"]},
    ]
    assert worker.updates == 3
    assert _steps(s0.history) == [(0, 1), (1, 2), (2, 3)]
    assert _steps(s1.history) == [(0, 1), (2, 3)]
    assert [h["step"] for h in s1.history if h.get("skipped")] == [1]
    assert [(e["step"], e["text"].split(":")[0]) for e in s1.errors] == [(1, "straggler")]


def test_a_gradient_that_never_comes_is_dropped_from_the_trunk_batch(cluster):
    """Client-batch: silo1 (scripted) takes its slice of the trunk batch and never sends its
    gradient. After straggler_timeout_s the trunk applies the batch's update from silo0's slice
    alone, answers silo0, and tells silo1 "straggler"."""
    c = cluster(mode="client-batch", silos=2, straggler_timeout_s=1.0)
    s0, p1 = c.silo(0), c.scripted(1)
    s0.start()
    assert p1.ready().kind == Kind.READY
    pending = s0.submit(s0.agent.train_step, 0)
    p1.handshake(0)
    p1.forward(0, 0)
    assert p1.recv(kinds=(Kind.FORWARD_RESULT, Kind.ERROR)).kind == Kind.FORWARD_RESULT
    # silo1 sends no BACKWARD
    error = p1.recv(kinds=(Kind.ERROR, Kind.BACKWARD_RESULT))
    assert error.kind == Kind.ERROR and error.text.startswith("straggler") and error.step == 0
    assert math.isfinite(pending.result(30))

    worker = c.worker("trunk0")
    assert worker.bundles == [{"step": 0, "members": ["silo0", "silo1"], "gradients": ["silo0"]}]
    assert worker.updates == 1 and _steps(s0.history) == [(0, 1)]


# ------------------------------------------------------------------------------------------ rollback


@pytest.mark.parametrize("restarted", ["silo1", "trunk0"])
def test_a_restarted_peer_rolls_every_other_peer_back_to_the_committed_round(cluster, restarted):
    """Round 0 is committed, round 1 under way, when one peer starts again (a new process, its own
    round-0 checkpoint on disk). The broker sends every other peer ROLLBACK to round 0; what a silo
    sends before its new READY is dropped (stale_after_rollback) and never reaches the trunk; and
    the replayed round 1 is exactly the first one."""
    c = cluster(mode="serial", silos=2, local_steps=2)
    silos = {"silo0": c.silo(0), "silo1": c.silo(1)}
    for s in silos.values():
        s.start()
    for step in (0, 1):
        for s in silos.values():
            s.step(step)
    [f.result(30) for f in [s.submit(s.agent._end_round, 0) for s in silos.values()]]
    wait_for(lambda: c.registry.committed_round() == 0, "round 0 to be committed")
    first = {sid: s.step(2) for sid, s in silos.items()}
    assert c.worker("trunk0").updates == 6

    if restarted == "silo1":
        silos["silo1"] = c.restart_silo(silos["silo1"])
        assert silos["silo1"].start() == 2  # it resumes after the committed round, from its own checkpoint
    else:
        c.restart_worker("trunk0")
    worker = c.worker("trunk0")
    told = [sid for sid in silos if sid != restarted]
    for sid in told:  # it knows nothing yet: it sends step 3, and hears ROLLBACK instead of a result
        with pytest.raises(Rollback) as rolled:
            silos[sid].step(3)
        assert rolled.value.round == 0
        assert silos[sid].recover(rolled.value) == 2
    wait_for(lambda: c.rejected("stale_after_rollback") == len(told), "the stale FORWARDs to be counted")
    if restarted == "silo1":
        wait_for(lambda: worker.kinds(Kind.ROLLBACK), "the worker's ROLLBACK")
    assert [r[4] for r in worker.kinds(Kind.ROLLBACK)] == (["0"] if restarted == "silo1" else [])

    replay = {sid: s.step(2) for sid, s in silos.items()}
    assert replay == first  # bit for bit: the same weights, data and trunk state as the first time
    assert worker.updates == 6  # round 0's 4 updates restored from its checkpoint, then the 2 replayed
    assert _steps(silos["silo0"].history) == [(0, 1), (1, 3), (2, 5)]
    assert _steps(silos["silo1"].history) == [(0, 2), (1, 4), (2, 6)]
    assert not [r for r in worker.kinds(Kind.FORWARD) if r[3] == 3], "a stale frame reached the trunk"
    wait_for(lambda: c.registry.round_state().get("rollbacks") == "1", "the rollback to be counted in Redis")


# ------------------------------------------------------------------------------------------ reregistration


def test_a_restarted_broker_has_unknown_peers_register_again(cluster):
    """The broker restarts in place (same ports, same Redis state). The silo's next frame is refused
    with "register..."; after its READY it is accepted, resumes from the committed round (none: the
    initial state) and replays the same steps; the worker registers again the same way."""
    c = cluster(mode="serial", local_steps=4)
    silo = c.silo(0)
    silo.start()
    first = [silo.step(0), silo.step(1)]
    worker = c.worker("trunk0")
    assert worker.updates == 2

    c.restart_broker()
    with pytest.raises(Reregister) as refused:
        silo.step(2)
    assert silo.errors[-1]["text"].startswith("register")
    assert silo.recover(refused.value) == 0  # nothing was committed: back to the initial state
    assert [silo.step(0), silo.step(1)] == first
    assert _steps(silo.history) == [(0, 1), (1, 2)] and worker.updates == 2
    assert [r for r in worker.kinds(Kind.ERROR) if r[4].startswith("register")]  # the worker was asked too
    assert set(c.broker.workers) == {"trunk0"} and int(c.registry.redis.get(c.registry.key("broker_epoch"))) >= 2
