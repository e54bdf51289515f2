"""Every structured value of a control message's text: to_text and from_text mirror each other,
and malformed text is a clear error, never a silently wrong value (issue 16)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.wire.control_text import AggAttempt, AggJoin, AggStart, PeerIntro, ResumePoint, RoundEnd
from shared.state.run_config import claim_line, parse_claim
from shared.wire.wire import FrameError

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)


@given(st.integers(min_value=-1, max_value=10**6))
def test_resume_point_round_trips_in_both_forms(rnd):
    point = ResumePoint(rnd)
    assert ResumePoint.from_text(point.to_text()) == point  # READY's ack: "resume=R"
    assert ResumePoint.from_text(point.to_rollback_text()) == point  # ROLLBACK: "R"


def test_resume_points():
    assert ResumePoint.from_text("resume=3").round == 3
    assert ResumePoint.from_text("-1").round == -1
    assert ResumePoint.from_text(None).round == -1
    for bad in ("resume=x", "resume=-5"):
        with pytest.raises(ValueError, match="bad resume point"):
            ResumePoint.from_text(bad)


@given(st.text(alphabet="0123456789abcdef", min_size=1, max_size=32))
def test_peer_intro_round_trips_with_its_config_claim(incarnation):
    config = {"run_id": "r", "head_layers": 2}
    intro = PeerIntro(incarnation, claim_line(config))
    back = PeerIntro.from_text(intro.to_text())
    assert back == intro
    assert parse_claim(intro.to_text())[1] == config  # the claim is still found in the whole text
    assert PeerIntro.from_text(None) == PeerIntro("")


@given(st.lists(ids, min_size=1, max_size=4, unique=True),
       st.dictionaries(ids, st.integers(min_value=0, max_value=10**9), min_size=1, max_size=6))
def test_round_end_round_trips(workers, weights):
    end = RoundEnd(tuple(workers), weights)
    assert RoundEnd.from_text(end.to_text()) == end
    assert end.to_text() == ",".join(workers) + ";" + ",".join(f"{s}:{n}" for s, n in sorted(weights.items()))


@pytest.mark.parametrize("bad", ["", "w0", "w0;", ";s:1", "w0;s:x", "w0;s:-1", "w0;s1", "a;b;c"])
def test_a_malformed_round_end_is_a_schema_error(bad):
    with pytest.raises(FrameError, match="bad ROUND_END text") as info:
        RoundEnd.from_text(bad)
    assert info.value.reason == "schema"


@given(st.lists(ids, max_size=8, unique=True), st.integers(0, 2**31 - 1))
def test_agg_start_round_trips(participants, attempt):
    start = AggStart(attempt, tuple(participants))
    assert AggStart.from_text(start.to_text()) == start


@given(st.integers(0, 2**62), st.integers(0, 2**31 - 1))
def test_agg_join_and_attempt_round_trip(weight, attempt):
    assert AggJoin.from_text(AggJoin(weight).to_text()) == AggJoin(weight)
    assert AggAttempt.from_text(AggAttempt(attempt).to_text()) == AggAttempt(attempt)


@pytest.mark.parametrize("bad", [None, "", "weight=", "weight=-1", "weight=1.5", "weight=x", "attempt=3",
                                 f"weight={2**62 + 1}", "weight=1;", " weight=1"])
def test_a_malformed_agg_join_is_refused(bad):
    with pytest.raises(ValueError):
        AggJoin.from_text(bad)


@pytest.mark.parametrize("bad", [None, "", "a,b", "attempt=;a", "attempt=-1;a", f"attempt={2**31};a", "weight=1;a"])
def test_a_malformed_agg_start_is_refused(bad):
    with pytest.raises(ValueError):
        AggStart.from_text(bad)


def test_a_silo_report_round_trips_and_nothing_else_gets_in():
    from shared.wire.control_text import SiloReport

    report = SiloReport({"round": 1, "step": 7, "loss": "2.500000", "pid": 42, "host": "h", "status": "finished"},
                        {"bad_tag": 3})
    assert SiloReport.from_text(report.to_text()) == report
    for bad in ("", "[]", "{\"fields\": {\"role\": \"trunk\"}}", "{\"fields\": {\"step\": \"7\"}}",
                "{\"fields\": {\"status\": \"revoked\"}}", "{\"fields\": {\"host\": \"" + "x" * 200 + "\"}}",
                "{\"rejected\": {\"x\": -1}}", "{\"fields\": {}, \"extra\": 1}",
                "{\"rejected\": {" + ",".join(f"\"r{i}\": 1" for i in range(33)) + "}}"):
        with pytest.raises(ValueError):
            SiloReport.from_text(bad)
