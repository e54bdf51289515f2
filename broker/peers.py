"""The peers the broker routes to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Worker:
    worker_id: str
    identity: bytes
