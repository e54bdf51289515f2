"""``--micro-batches auto``: the depth that covers one round trip, from the waits a silo measures and
the compute time the trunk reports."""

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


def test_probe_measures_after_the_first_step_then_keeps_its_choice():
    probe = DepthProbe("auto", rows=8)
    assert probe.depth == 1
    probe.observe(5.0, 5.0, 0.1)  # the first step (warm-up) is not counted
    for _ in range(PROBE_STEPS - 1):
        probe.observe(0.08, 0.08, 0.1)  # rtt = (0.16 - 0.1) / 2 = 0.03
        assert probe.depth == 1
    probe.observe(0.08, 0.08, 0.1)
    assert probe.depth == depth_for(0.03, 0.1, 8) == 2
    probe.observe(1.0, 1.0, 0.1)  # later steps do not move it
    assert probe.depth == 2


def test_a_fixed_depth_is_kept_and_capped_at_the_rows():
    assert DepthProbe(3, rows=8).depth == 3
    assert DepthProbe(16, rows=4).depth == 4


def test_a_trunk_that_reports_no_compute_time_leaves_depth_one():
    probe = DepthProbe("auto", rows=8)
    for _ in range(PROBE_STEPS + 2):
        probe.observe(0.5, 0.5, None)
    assert probe.depth == 1
