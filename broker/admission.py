"""Who may join the run: a silo's or a trunk worker's READY, its signed registration, its config
claim, and whether it is a new process (a restart rolls the run back to the last committed round)."""

from __future__ import annotations

import logging
import time

from broker.peers import Worker
from shared.crypto.registration import verify_registration
from shared.state.registry import retry_redis
from shared.state.run_config import describe, differences, parse_claim
from shared.wire.control_text import PeerIntro, ResumePoint
from shared.wire.protocol import Kind, Reason
from shared.wire.wire import FrameError, Header, Message, message_from_wire

log = logging.getLogger("broker")


class BrokerAdmission:
    """Part of Broker (broker/broker.py): READY from silos and trunk workers."""

    def _silo_ready(self, silo: str, identity: bytes, header: Header, frames: list) -> None:
        """A silo's READY: its signed registration, its config claim, its connection; then it is
        told where the run stands."""
        known = self.silo_identity.get(silo)
        if self.settings.encryption:
            # Only the holder of the enrolled identity key registers as this silo, so a genuine
            # (e.g. restarted) silo takes its id back at once and nobody else can squat it.
            try:
                self.ready_ts[silo] = self._verify_ready(frames, silo)
            except FrameError as exc:
                self._reject(exc.reason, exc.detail, self.frontend, identity, header)
                return
            known = None
        if refusal := self._config_refusal(header, frames, "silo"):
            self._reject(*refusal, self.frontend, identity, header)
            return
        silent_s = time.monotonic() - self.silo_seen.get(silo, 0.0)
        if known is not None and known != identity and silent_s < self.settings.liveness_ttl_s:
            # A live silo keeps its connection: another peer may not take its place. A restarted
            # silo gets it once the old connection has been silent for liveness_ttl_s.
            self._reject(Reason.IDENTITY_TAKEN, f"{silo} is registered on another connection that is alive",
                         self.frontend, identity, header)
            return
        self.silo_identity[silo] = identity
        self.silo_seen[silo] = time.monotonic()
        self.left.discard(silo)
        self.schedule.silo_registered(silo)
        self._admit(silo, header, "silo", frames)
        self.rolling_back.discard(silo)
        self._send(self.frontend, identity, Message(Kind.READY, self.run_id, silo,
                                                    text=ResumePoint(self.committed_round).to_text()))
        log.info("silo %s ready (resumes after round %d)", silo, self.committed_round)


    def _worker_ready(self, identity: bytes, header: Header, frames: list) -> None:
        """A trunk worker's READY (it names itself in the id field): its config claim, then the
        silos' current handshakes when it is a new process."""
        worker_id = header.silo_id  # a worker's READY names the worker in the id field
        if refusal := self._config_refusal(header, frames, "trunk worker"):
            self._reject(*refusal, self.backend, identity, header)
            return
        self.workers[worker_id] = Worker(worker_id, identity)
        self.worker_seen[worker_id] = time.monotonic()
        self.purged.pop(worker_id, None)
        new_process = self._admit(worker_id, header, "worker", frames)
        self.rolling_back.discard(worker_id)
        self._send(self.backend, identity, Message(Kind.READY, self.run_id, worker_id,
                                                   text=ResumePoint(self.committed_round).to_text()))
        log.info("trunk worker %s ready", worker_id)
        if new_process:  # it holds no sessions yet: give it the silos' current handshakes
            for hello in self.latest_hello.values():
                self._route(self.backend, identity, hello)


    def _verify_ready(self, frames: list, silo: str) -> int:
        msg = message_from_wire([f.buffer for f in frames], self.settings.max_tensor_bytes)
        if not msg.tensors:
            raise FrameError("bad_registration", f"READY for {silo} carries no signed registration token")
        return verify_registration(bytes(msg.tensors[0].numpy()), self.run_id, silo,
                                   lambda s: retry_redis(self.directory.lookup, s, attempts=8), self.ready_ts.get(silo))

    def _admit(self, peer: str, header: Header, role: str, frames: list | None = None) -> bool:
        """A (re)registration. A known peer in a new process means it crashed and lost its state
        since the last committed round: the whole run goes back there, so nothing is lost or doubled."""
        incarnation = self._incarnation_of(header, frames)
        known = self.incarnation.get(peer)
        self.incarnation[peer] = incarnation
        if role == "silo" and peer in self.away:
            # The run went on without it: it rejoins at the next round, nobody rolls back.
            self.away.discard(peer)
            log.warning("silo %s is back: it rejoins after round %d", peer, self.committed_round)
            self._reset_schedule_for_return(peer)
        elif known is not None and known != incarnation:
            self._rollback(f"{role} {peer} restarted", exclude=peer)
        return known != incarnation  # a new process (first start or restart), not a re-registration

    def _incarnation_of(self, header: Header, frames: list | None) -> str:
        return PeerIntro.from_text(_text_of(header, frames)).incarnation

    def _config_refusal(self, header: Header, frames: list, role: str) -> tuple[str, str] | None:
        """(reason, detail) when a READY's config claim (shared/state/run_config.py) differs from the run's."""
        try:
            claim = parse_claim(_text_of(header, frames))
        except ValueError as exc:
            return "bad_config", str(exc)
        if claim is None:
            return None  # a peer that claims none still checked the run's config itself at start
        _, theirs = claim
        if not set(theirs) <= set(self.run_reference) | set(self.own_config):
            self.run_reference = self._load_run_config() or self.run_reference  # recorded since we started
        if diffs := differences({**self.run_reference, **self.own_config}, theirs):
            return "config_mismatch", describe(diffs, "run", f"this {role}")
        if missing := {k: v for k, v in theirs.items() if k not in self.run_reference}:
            # the first peer to claim a field sets it for the run (silos cannot write to Redis themselves)
            self.run_reference = {**missing, **self.run_reference}
            self.writes.call("record the run config", self.registry.claim_run_config, missing)
        return None

    def _load_run_config(self) -> dict:
        try:
            return self._redis("read the run config", self.registry.run_config) or {}
        except ValueError as exc:  # hand-edited metadata: every role's own start-up check says so too
            log.warning("%s", exc)
            return {}


def _text_of(header: Header, frames: list | None) -> str:
    """The text frame of a message already validated by split_frames ("" when it has none)."""
    if not header.has_text or not frames:
        return ""
    return bytes(frames[-1].buffer).decode("utf-8", "replace")
