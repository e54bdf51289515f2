"""A trunk worker dying at a round's end must not stall the round (broker/trunk_rounds.py)."""

from broker.trunk_rounds import TrunkRounds


def _started() -> TrunkRounds:
    rounds = TrunkRounds()
    sent = rounds.start(0, ["t0", "t1", "t2"], ["t0", "t1"], {"s0": 10, "s1": 30})
    assert sent == [("t0", "t0,t1;s0:10,s1:30"), ("t1", "t0,t1;s0:10,s1:30"), ("t2", None)]
    return rounds


def test_partials_go_to_every_averaging_worker_and_the_last_done_finishes():
    rounds = _started()
    assert rounds.relay_targets(0, "t0") == ["t0", "t1"]
    assert rounds.relay_targets(0, "t2") == []  # not averaging: nothing to relay
    assert rounds.relay_targets(7, "t0") == []  # unknown round
    assert [rounds.done(0, w) for w in ("t2", "t0", "t1")] == [False, False, True]
    assert rounds.done(0, "t1") is False  # a duplicate after the end changes nothing


def test_a_worker_dead_before_its_partial_restarts_the_averaging_without_it_and_its_silos():
    rounds = _started()
    assert rounds.relay_targets(0, "t0") == ["t0", "t1"]
    rounds.done(0, "t2")
    finished, resend = rounds.worker_lost("t1", {"s1"})
    assert finished == []
    assert resend == {0: [("t0", "t0;s0:10")]}
    assert rounds.relay_targets(0, "t0") == ["t0"]
    assert rounds.done(0, "t0") is True


def test_a_worker_dead_after_its_partial_went_out_is_only_no_longer_waited_for():
    rounds = _started()
    rounds.relay_targets(0, "t1")
    rounds.done(0, "t0")
    rounds.done(0, "t2")
    assert rounds.worker_lost("t1", {"s1"}) == ([0], {})


def test_when_no_silo_is_left_to_average_the_survivors_only_checkpoint():
    rounds = TrunkRounds()
    rounds.start(3, ["t0", "t1"], ["t1"], {"s1": 5})
    assert rounds.worker_lost("t1", {"s1"}) == ([], {3: []})
    assert rounds.done(3, "t0") is True
    rounds.start(4, ["t0", "t1"], ["t0", "t1"], {"s0": 5, "s1": 5})
    assert rounds.worker_lost("t0", {"s0"}) == ([], {4: [("t1", "t1;s1:5")]})


def test_trunk_sync_partials_open_only_for_the_service_and_their_round():
    """The worker-to-worker partial sums: exact round trip, sealed under the trunk service key."""
    from types import SimpleNamespace

    import pytest
    import torch
    from cryptography.hazmat.primitives.asymmetric import x25519

    from shared.wire.wire import FrameError
    from trunk_worker.trunk_sync import TrunkSync

    service = SimpleNamespace(x25519=x25519.X25519PrivateKey.generate())
    w0, w1 = TrunkSync("run", "w0", service), TrunkSync("run", "w1", service)
    partial = torch.randn(1000, dtype=torch.float64)
    sealed = w0.seal(3, partial, 7.0)
    assert sealed.numel() > 8 * 1001 and not bytes(sealed.numpy()).count(partial.numpy().tobytes()[:64])
    values, weight = w1.open(3, "w0", sealed)
    assert torch.equal(values, partial) and weight == 7.0
    for rnd, sender in ((4, "w0"), (3, "w1")):  # another round, or a claimed other sender
        with pytest.raises(FrameError, match="does not open"):
            w1.open(rnd, sender, sealed)
    outsider = TrunkSync("run", "w1", SimpleNamespace(x25519=x25519.X25519PrivateKey.generate()))
    with pytest.raises(FrameError, match="does not open"):
        outsider.open(3, "w0", sealed)
    for at in (40, 12):  # the encrypted partial, or the weight that travels beside it
        tampered = sealed.clone()
        tampered[at] ^= 1
        with pytest.raises(FrameError, match="does not open"):
            w1.open(3, "w0", tampered)
    with pytest.raises(FrameError, match="bytes"):
        w1.open(3, "w0", sealed[:30])  # truncated


def test_trunk_sync_average_is_the_weighted_mean_of_every_workers_partial():
    """Both workers' partials, sealed and opened, give sum(partials) / sum(weights) exactly; so does
    the unencrypted layout (no trunk key)."""
    from types import SimpleNamespace

    import torch
    from cryptography.hazmat.primitives.asymmetric import x25519

    from trunk_worker.trunk_sync import TrunkSync

    service = SimpleNamespace(x25519=x25519.X25519PrivateKey.generate())
    g = torch.Generator().manual_seed(0)
    p0, p1 = torch.randn(257, dtype=torch.float64, generator=g), torch.randn(257, dtype=torch.float64, generator=g)
    expected = (torch.zeros(257, dtype=torch.float64) + p0 + p1) / 5.0
    for keys in (service, None):
        w0, w1 = TrunkSync("run", "w0", keys), TrunkSync("run", "w1", keys)
        sealed = {"w0": w0.seal(2, p0, 2.0), "w1": w1.seal(2, p1, 3.0)}
        w0.expected[2] = ["w0", "w1"]
        assert w0.add(2, "w1", w0.open(2, "w1", sealed["w1"])) is None  # waits for the other partial
        average = w0.add(2, "w0", w0.open(2, "w0", sealed["w0"]))
        assert torch.equal(average, expected)
        assert 2 not in w0.partials and 2 not in w0.expected


def test_a_round_whose_only_worker_dies_before_checkpointing_it_never_finishes():
    """Serial and client-batch: one trunk state on one worker. If it dies between the round's last
    step and its checkpoint, committing the round would leave no trunk to restore to it."""
    rounds = TrunkRounds()
    rounds.start(1, ["t0"], [], {"s0": 5})
    assert rounds.worker_lost("t0", set()) == ([1], {})  # the silos' round closes: nobody waits for the dead
    assert rounds.blocks_commit(1)  # but it never commits
    # ...until the same worker turns out to be alive (it was only slow): it checkpoints the round
    assert rounds.readmitted("t0") == {1: [("t0", None)]}
    assert rounds.done(1, "t0") is True and not rounds.blocks_commit(1)


def test_a_round_ending_with_no_worker_at_all_never_commits():
    rounds = TrunkRounds()
    assert rounds.start(2, [], [], {"s0": 5}) == []
    assert rounds.blocks_commit(2)
    assert rounds.readmitted("t0") == {2: [("t0", None)]}
    assert rounds.done(2, "t0") is True


def test_a_dead_worker_after_another_checkpointed_the_round_only_stops_being_waited_for():
    rounds = TrunkRounds()
    rounds.start(0, ["t0", "t1"], [], {})
    rounds.done(0, "t0")
    assert rounds.worker_lost("t1", set()) == ([0], {})
    assert not rounds.blocks_commit(0) and rounds.readmitted("t1") == {}
