"""The trunk's side of each silo's per-round handshake: verify the hello, keep the session, ack."""

from __future__ import annotations

import logging

import torch

from shared.crypto.handshake import accept_hello
from shared.crypto.sealed_codec import SealedCodec
from shared.crypto.sealing import SealError
from shared.state.registry import retry_redis
from shared.state.run_config import config_digest, describe, differences, parse_claim
from shared.wire.protocol import Kind
from shared.wire.wire import Message
from trunk_worker.step_error import StepError

log = logging.getLogger("trunk")


class TrunkSessions:
    """Part of TrunkWorker (trunk_worker/worker.py): the silos' sessions."""

    def hello(self, msg: Message) -> Message | None:
        """A silo's handshake for this round: verify it against the allow-list, keep the session."""
        if not isinstance(self.codec, SealedCodec):
            raise StepError("encryption_off", "this trunk runs without encryption; start the silo with --encryption false")
        raw = bytes(msg.tensors[0].numpy())
        if self.accepted_hellos.get(msg.silo_id) == raw:
            return None  # the same hello again (replayed to us by the broker): the session stands
        session = accept_hello(
            raw, self.keys, lambda silo: retry_redis(self.directory.lookup, silo),
            self.settings.run_id, allowed_ciphers=(self.settings.cipher,), guard=self.hello_guard,
            sender_slot=self.sender_slot, max_tensor_bytes=self.settings.max_tensor_bytes,
            config_digest=self._hello_config_digest(msg))
        if (session.silo_id, session.round) != (msg.silo_id, msg.round):
            raise SealError("wrong_session", "hello contents do not match its header")
        self.codec.sessions.add(session)
        self.accepted_hellos[msg.silo_id] = raw
        log.info("session with %s for round %d (%s)", session.silo_id, session.round, session.cipher)
        ack = torch.frombuffer(bytearray(session.ack()), dtype=torch.uint8)
        return Message(Kind.HELLO_ACK, msg.run_id, msg.silo_id, msg.round, msg.step, tensors=[ack])

    def _hello_config_digest(self, msg: Message) -> str | None:
        """The run config digest a silo's hello must be signed over: the fields it claims (in the
        HELLO's text), with THIS trunk's values, so a claim altered on the way fails the signature.
        None: the silo claims nothing (its signature then covers no digest)."""
        try:
            claim = parse_claim(msg.text)
        except ValueError as exc:
            raise StepError("bad_config", str(exc)) from None
        if claim is None:
            return None
        _, theirs = claim
        if diffs := differences(self.run_config, theirs):
            raise StepError("config_mismatch", describe(diffs, "trunk", "silo"))
        if unknown := sorted(set(theirs) - set(self.run_config)):
            raise StepError("config_mismatch", f"{', '.join(unknown)}: not a setting of this trunk")
        return config_digest({k: self.run_config[k] for k in theirs})
