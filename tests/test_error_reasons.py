"""ERROR reasons are typed: one mirrored to-text/from-text pair, round-tripped here, and no role
matches ERROR text by prefix (a grep of the roles, so a new prefix match fails this test)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.wire.protocol import ErrorReason, Reason

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("reason", list(Reason))
@pytest.mark.parametrize("detail", ["", "trunk worker w0 lost", "fields differ: dtype: fp32 != bf16"])
def test_every_reason_round_trips_with_any_detail(reason, detail):
    error = ErrorReason.of(reason, detail)
    back = ErrorReason.from_text(error.to_text())
    assert back == error and back.code is reason


def test_a_counter_name_is_kept_but_not_acted_on():
    error = ErrorReason.from_text("bad_length: frame 1 is 12 bytes, expected 16")
    assert (error.name, error.detail, error.code) == ("bad_length", "frame 1 is 12 bytes, expected 16", None)
    assert ErrorReason.from_text(None) == ErrorReason("")


def test_a_reason_is_matched_whole_not_by_prefix():
    assert ErrorReason.from_text("registered: elsewhere").code is None  # not REGISTER
    assert ErrorReason.from_text("retry").code is Reason.RETRY


def test_no_role_matches_error_text_by_prefix():
    pattern = re.compile(r"\.text\b[^\n]*\.startswith\(|startswith\(\"(register|retry|straggler|config_mismatch)")
    hits = [f"{path.relative_to(ROOT)}:{n}" for folder in ("broker", "silo_agent", "trunk_worker")
            for path in sorted((ROOT / folder).rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
