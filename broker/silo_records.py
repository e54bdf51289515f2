"""What the broker writes to and reads from Redis on the silos' behalf: silos reach only the broker.

A silo's PROGRESS reports (shared/wire/control_text.py SiloReport) become its hash in Redis (who it is,
its latest step and loss, its status), its liveness key is refreshed while its connection is heard,
the frames it rejected are counted, and the participants' keys for secure aggregation are read
from the directory and handed to them with AGG_START (shared/crypto/peer_keys.py). Every write goes
through the broker's background writer, off the poll loop.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from redis import RedisError

from broker.redis_writes import RedisWrites
from shared.crypto import enrollment
from shared.wire.control_text import SiloReport
from shared.crypto.keys import KeyStoreError
from shared.crypto.peer_keys import PeerEntry, PeerKeys
from shared.state.registry import Registry

log = logging.getLogger("broker")


class SiloRecords:
    def __init__(self, registry: Registry, writes: RedisWrites, liveness_ttl_s: int) -> None:
        self.registry = registry
        self.writes = writes
        self.ttl_s = liveness_ttl_s

    def report(self, silo: str, report: SiloReport) -> None:
        fields = dict(report.fields)
        status = fields.pop("status", None)
        registry = self.registry
        if "pid" in fields:  # the silo (re)started: a fresh membership entry, as join() writes it
            self.writes.call(f"record {silo} joining", partial(registry.join, "silo", silo, **fields))
        elif fields:
            self.writes.call(f"record {silo}'s progress", partial(registry.update, "silo", silo, **fields))
        for reason, n in report.rejected.items():
            self.writes.count_rejected(f"silo:{reason}", n)
        if status in ("finished", "failed"):
            self.writes.call(f"record {silo} leaving", registry.leave, "silo", silo, status)

    def alive(self, silos: list[str]) -> None:
        """Refresh the liveness keys of silos heard within their TTL (`splitfed status`)."""
        for silo in silos:
            self.writes.call(f"beat {silo}", self.registry.heartbeat, "silo", silo, self.ttl_s)

    def peer_keys(self, participants: list[str]) -> torch.Tensor:
        """The participants' enrolled keys and certificates, the operator key and the revocation
        list, as one uint8 payload for AGG_START (read when an attempt starts, never per step)."""
        entries, operator, revocations = [], None, None
        try:
            operator = enrollment.operator_public_key(self.registry)
            revocations = enrollment.revocations(self.registry)
            for silo in participants:
                entry = enrollment.lookup(self.registry, silo)
                if entry is not None and not entry.revoked:
                    entries.append(PeerEntry(silo, entry.ed25519_public, entry.x25519_public, entry.certificate))
        except (RedisError, KeyStoreError) as exc:
            # a participant without a key: the silos refuse to mask towards nobody and say so
            log.warning("could not read the participants' keys: %s", exc)
        payload = PeerKeys(tuple(entries), operator, revocations).to_wire()
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8)
