"""How a silo makes itself known: READY to the broker, a fresh session with the trunk each round,
and PROGRESS reports (what the broker records in Redis on the silo's behalf)."""

from __future__ import annotations

import logging
import os
import socket
import time

import torch
import zmq

from shared.crypto.handshake import make_hello
from shared.crypto.registration import sign_registration
from shared.crypto.sealed_codec import SealedCodec
from shared.crypto.sealing import SealError
from shared.state.run_config import claim_line, config_digest
from shared.wire.control_text import MAX_REJECTED_REASONS, SiloReport
from shared.wire.protocol import Kind
from shared.wire.wire import Message
from silo_agent.peer_errors import IdentityTaken, PeerError, Reregister, Rollback, resume_round

log = logging.getLogger("silo")


class SiloRegistration:
    """Part of SiloAgent (silo_agent/agent.py): its registration, handshakes and reports."""

    def _register(self) -> int:
        """READY until accepted. After a restart the broker may still hold our old connection:
        it frees the id once that one has been silent for liveness_ttl_s, so retry with back-off."""
        s = self.settings
        delay, deadline = 0.25, time.monotonic() + 3 * s.liveness_ttl_s
        while True:
            # prove we hold the enrolled identity (sealed runs)
            token = [sign_registration(self.keys, s.run_id, s.silo_id)] if isinstance(self.codec, SealedCodec) else []
            self.link.register(self.incarnation, self.run_config, token)
            try:
                ack = self.await_reply(Kind.READY, step=0)
                break
            except (Reregister, Rollback) as exc:
                # Replies to what we sent before this READY (e.g. heartbeats to a restarted broker):
                # the READY's own answer says where to resume. Say READY again, at most twice a second.
                log.info("while registering: %s", exc)
                time.sleep(0.5)
            except IdentityTaken:
                if time.monotonic() + delay > deadline:
                    raise
                log.info("the broker still holds %s's previous connection; retrying in %.2fs", s.silo_id, delay)
                time.sleep(delay)
                delay *= 2
        log.info("silo %s registered with the broker (%d examples)", s.silo_id, self.dataset.num_examples)
        self.report(samples=len(self.dataset), steps=s.steps, pid=os.getpid(), host=socket.gethostname()[:128])
        return resume_round(ack.text)

    def _handshake(self, rnd: int, step: int) -> None:
        """A fresh session key each round: a leaked key exposes one round at most."""
        s = self.settings
        # The trunk accepts only hellos signed later than the last one it accepted: keep this
        # process's timestamps strictly increasing even if the wall clock steps back.
        self._hello_ns = max(time.time_ns(), self._hello_ns + 1)
        # The run config's digest is signed into the hello, so the trunk checks our settings itself.
        hello, pending = make_hello(self.keys, s.silo_id, s.run_id, rnd, cipher=s.cipher, now_ns=self._hello_ns,
                                    max_tensor_bytes=s.max_tensor_bytes, config_digest=config_digest(self.run_config))
        self.send(Message(Kind.HELLO, s.run_id, s.silo_id, rnd, step,
                          tensors=[torch.frombuffer(bytearray(hello), dtype=torch.uint8)],
                          text=claim_line(self.run_config)))
        for _ in range(3):
            ack = self.await_reply(Kind.HELLO_ACK, step)
            try:
                # Raises SealError("fingerprint_mismatch") unless the trunk holds the key pinned in our settings.
                session = pending.complete_ack(bytes(ack.tensors[0].numpy()), s.trunk_fingerprint)
                break
            except SealError as exc:
                if exc.reason != "bad_ack":
                    raise
                # An ack of an earlier hello of ours (e.g. replayed to a restarted trunk) can still be
                # in flight: it fails key confirmation. Wait for the one that answers this hello.
                log.warning("ignoring a HELLO_ACK that does not confirm this hello")
        else:
            raise PeerError("no HELLO_ACK confirmed this round's hello")
        self.codec.sessions.add(session)
        log.info("round %d: session established with trunk %s", rnd, s.trunk_fingerprint[:23])

    def report(self, **fields) -> None:
        """PROGRESS to the broker, which records it in Redis: ``fields`` and the latest step, and the
        frames refused since the last report. Best effort: monitoring never stops training."""
        s = self.settings
        refused = self.link.rejected
        # within what the broker accepts of a report (shared/wire/control_text.py), or it refuses it whole
        rejected = {reason[:32]: min(n, 2**31 - 1) for reason, n in refused.most_common(MAX_REJECTED_REASONS)}
        report = SiloReport({**self._progress_fields(), **fields}, rejected)
        try:
            self.send(Message(Kind.PROGRESS, s.run_id, s.silo_id, text=report.to_text()))
        except zmq.ZMQError as exc:
            log.warning("could not report progress to the broker: %s", exc)
            return
        refused.clear()
        self._reported_at = time.monotonic()

    def _progress_fields(self) -> dict:
        """The latest step for `splitfed status` and the demo (empty before the first step)."""
        done = [h for h in self.history if not h.get("skipped")]
        if not self.settings.report_loss or not done:
            return {}
        last = done[-1]
        return {"round": last["round"], "step": last["step"], "loss": f"{last['loss']:.6f}",
                "updated_at": f"{time.time():.3f}"}
