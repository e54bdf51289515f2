"""Identifiers of runs, silos and workers: short ASCII names that fit the fixed header fields.

Kept free of torch so that settings, `splitfed keys` and `splitfed status` start fast.
"""

from __future__ import annotations

ID_FIELD_BYTES = 16
ID_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def check_id(value: str, what: str = "id") -> str:
    """Run, silo and worker ids: 1..16 chars of [A-Za-z0-9_.-] (they are fixed header fields)."""
    if not isinstance(value, str) or not 0 < len(value) <= ID_FIELD_BYTES or not set(value) <= ID_ALPHABET:
        raise ValueError(
            f"invalid {what} {value!r}: use 1-{ID_FIELD_BYTES} characters from A-Z a-z 0-9 _ . -"
        )
    return value
