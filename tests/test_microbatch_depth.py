"""``--micro-batches auto``: the depth that covers one round trip, from the waits a silo measures and
the compute time the trunk reports; kept only if it shortens the silo's steps."""

from __future__ import annotations

import pytest

from silo_agent.microbatch_depth import PROBE_STEPS, DepthProbe, depth_for


@pytest.mark.parametrize("rtt, trunk, rows, want", [
    (0.0, 0.1, 8, 1),       # loopback: nothing to hide
    (0.004, 0.1, 8, 1),     # under 5% of the trunk's step: pieces would cost more than they hide
    (0.05, 0.1, 8, 2),      # d >= 1 / (1 - 0.5) = 2
    (0.06, 0.1, 8, 3),      # 1 / 0.4 = 2.5 -> 3
    (0.075, 0.1, 8, 4),     # 1 / 0.25 = 4
    (0.09, 0.1, 4, 4),      # 10 wanted, capped at the rows
    (0.2, 0.1, 8, 8),       # the round trip is longer than the trunk's step: row by row
    (0.2, 0.1, 1, 1),       # one row cannot be cut
])
def test_depth_covers_the_round_trip(rtt, trunk, rows, want):
    d = depth_for(rtt, trunk, rows)
    assert d == want
    if 1 < d < rows:  # the rule itself: d >= 1 + rtt / (trunk / d), and d - 1 would not do
        assert d >= 1 + rtt / (trunk / d) - 1e-9
        assert d - 1 < 1 + rtt / (trunk / (d - 1))


def _probe_at_depth_one(probe: DepthProbe, step_s: float = 1.0) -> None:
    probe.observe(1, 9.0, (5.0, 5.0), 0.1)  # the first step (warm-up) is not counted
    for _ in range(PROBE_STEPS):
        assert probe.depth == 1
        probe.observe(1, step_s, (0.08, 0.08), 0.1)  # rtt = (0.16 - 0.1) / 2 = 0.03 -> depth 2


@pytest.mark.parametrize("trial_s, kept", [(0.8, 2), (1.2, 1)])
def test_the_depth_is_tried_and_kept_only_if_steps_get_shorter(trial_s, kept):
    probe = DepthProbe("auto", rows=8)
    _probe_at_depth_one(probe)
    assert probe.depth == depth_for(0.03, 0.1, 8) == 2  # the trial
    for _ in range(PROBE_STEPS):
        probe.observe(2, trial_s, None, 0.05)
    assert probe.depth == kept
    probe.observe(kept, 0.01, None, 0.01)  # later steps do not move it
    assert probe.depth == kept


def test_no_trial_when_the_round_trip_is_negligible():
    probe = DepthProbe("auto", rows=8)
    probe.observe(1, 9.0, (5.0, 5.0), 0.1)
    for _ in range(PROBE_STEPS):
        probe.observe(1, 0.1, (0.051, 0.051), 0.1)  # rtt 1 ms of a 100 ms trunk step
    assert probe.depth == 1 and probe.chosen == 1


def test_a_fixed_depth_is_kept_and_capped_at_the_rows():
    assert DepthProbe(3, rows=8).depth == 3
    assert DepthProbe(16, rows=4).depth == 4


def test_a_trunk_that_reports_no_compute_time_leaves_depth_one():
    probe = DepthProbe("auto", rows=8)
    for _ in range(PROBE_STEPS + 2):
        probe.observe(1, 1.0, (0.5, 0.5), None)
    assert probe.depth == 1 and probe.chosen == 1
