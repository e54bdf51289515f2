"""The silo's side of a round's end: FedAvg of head/tail weights through the broker, masked.

    silo --AGG_JOIN(weight)--> broker            the silo's steps of the round are done
    silo <--AGG_START(participants, attempt)--   the broker fixed who takes part
    silo --AGG_UPLOAD(masked n*x, n)-->          masks cancel only in the sum of all participants
    silo <--AGG_RESULT(sum)--  or a new AGG_START (someone dropped: mask again for the new set)

The broker sees masked uploads and the sum, never one silo's weights (shared/crypto/secure_agg.py).
Without encryption keys there is nothing to derive masks from: the upload is then unmasked, and
the run says so in its log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from shared.crypto import secure_agg
from shared.wire.control_text import AggAttempt, AggJoin, AggStart
from shared.wire.protocol import Kind
from shared.crypto.peer_keys import HandedKeys
from shared.wire.wire import FrameError, Message

log = logging.getLogger("silo")

class RoundAggregation:
    def __init__(self, silo_id: str, run_id: str, params: list[torch.nn.Parameter], weight: int,
                 peer_keys: HandedKeys, x25519_key, send: Callable[[Message], None],
                 await_msg: Callable[[Callable[[Message], bool], str], Message]) -> None:
        self.silo_id, self.run_id = silo_id, run_id
        self.params = params
        self.weight = weight
        self.peer_keys = peer_keys  # peers' X25519 keys, handed with AGG_START (verified when the operator is pinned)
        self.key = x25519_key  # None: no keys, uploads go unmasked
        self.send, self.await_msg = send, await_msg
        self._warned = False

    def run(self, rnd: int) -> bool:
        """The round barrier, with FedAvg when the broker starts one; True when weights were averaged.

        Returns once the broker closes the round (after the trunk workers' round checkpoint):
        with AGG_RESULT for a participant, ROUND_CLOSED for a silo that is not one.
        """
        self.send(Message(Kind.AGG_JOIN, self.run_id, self.silo_id, rnd, text=AggJoin(self.weight).to_text()))
        ends = (Kind.AGG_START, Kind.ROUND_CLOSED)
        msg = self.await_msg(lambda m: m.kind in ends and m.round == rnd, f"the end of round {rnd}")
        while msg.kind == Kind.AGG_START:
            start = _agg_start(msg)
            participants, attempt = list(start.participants), start.attempt
            self._take_peer_keys(msg)
            self.send(Message(Kind.AGG_UPLOAD, self.run_id, self.silo_id, rnd, text=AggAttempt(attempt).to_text(),
                              tensors=[self._upload(rnd, attempt, participants)]))
            msg = self.await_msg(lambda m: m.round == rnd and (m.kind in ends or
                                                               (m.kind == Kind.AGG_RESULT and _attempt_of(m) == attempt)),
                                 f"AGG_RESULT of round {rnd}")
            if msg.kind == Kind.AGG_RESULT:
                secure_agg.unflatten_into(self.params, secure_agg.average_from_sum(msg.tensors[0]))
                log.info("round %d: averaged with %d silos (attempt %d)", rnd, len(participants), attempt)
                return True
            if msg.kind == Kind.AGG_START:
                log.info("round %d: participant set changed (attempt %d), masking again", rnd, _agg_start(msg).attempt)
        log.info("round %d closed without aggregation for this silo: keeping its weights", rnd)
        return False

    def _upload(self, rnd: int, attempt: int, participants: list[str]) -> torch.Tensor:
        if self.key is None:
            if not self._warned:
                log.warning("aggregation WITHOUT masks: no encryption keys, the broker sees this silo's weights")
                self._warned = True
            return secure_agg.plain_upload(self.params, self.weight)
        return secure_agg.masked_upload(self.params, self.weight, self.silo_id, self.key, self._public_of,
                                        self.run_id, rnd, attempt, participants)

    def _take_peer_keys(self, msg: Message) -> None:
        if self.key is None:
            return  # unmasked uploads use no peer key
        try:
            self.peer_keys.take(bytes(msg.tensors[0].numpy()) if msg.tensors else b"")
        except FrameError as exc:  # a swapped key or a bad certificate: never mask towards it
            raise secure_agg.SecureAggError(exc.reason, f"the participants' keys of round {msg.round}: {exc.detail}") from None

    def _public_of(self, silo: str) -> bytes:
        public = self.peer_keys.keys.get(silo)
        if public is None:
            raise secure_agg.SecureAggError("not_enrolled", f"participant {silo} is not enrolled in this run")
        return public


def _agg_start(msg: Message) -> AggStart:
    try:
        return AggStart.from_text(msg.text)
    except ValueError as exc:  # the broker's own message: a broken one ends the round for us
        raise secure_agg.SecureAggError("bad_agg_start", f"round {msg.round}: {exc}") from None


def _attempt_of(msg: Message) -> int | None:
    """An AGG_RESULT's attempt; None (never awaited) when its text is malformed."""
    try:
        return AggAttempt.from_text(msg.text).attempt
    except ValueError:
        return None
