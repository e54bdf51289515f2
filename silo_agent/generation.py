"""The silo's side of split generation through the live pipeline.

``RemoteTrunk`` is the TrunkStep of shared/model/generation.py over the wire: each call seals the new
positions' h1 (plus their mask columns and position ids) into a GENERATE, and opens the trunk's
GENERATE_RESULT; ``close`` sends GENERATE_END so the trunk frees its cache. Head and tail keep
their own caches in this process; token ids never leave it.

``generate_live`` is what ``--generate PROMPTS.jsonl`` runs after training: it completes every
prompt (greedy) and writes the texts and, per generation step, the bytes of every payload frame
actually sent, so anyone can check that after the prompt one position per token crossed the wire.
"""

from __future__ import annotations

import json

import torch

from shared.state.atomic_files import write_bytes_atomic
from shared.data.dataset import load_jsonl
from shared.model.generation import Sampling, generate_texts
from shared.model.models import resolve_model_dir
from shared.wire.protocol import Kind
from shared.data.tokenizer import load_tokenizer
from shared.wire.wire import Message


class RemoteTrunk:
    def __init__(self, agent, round_no: int) -> None:
        self.agent, self.round_no = agent, round_no
        self.step = 0
        self.frames: list[dict] = []  # per step: payload bytes sent, shape of the h2 received

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        s = self.agent.settings
        msg = Message(Kind.GENERATE, s.run_id, s.silo_id, self.round_no, self.step,
                      tensors=[hidden.to(self.agent.wire_dtype), mask.to(torch.uint8), positions.to(torch.int32)])
        frames = self.agent.link.send(msg)
        reply = self.agent.await_reply(Kind.GENERATE_RESULT, self.step)
        h2 = reply.tensors[0]
        if h2.shape != hidden.shape:
            raise ValueError(f"trunk returned {tuple(h2.shape)} for {tuple(hidden.shape)}")
        self.frames.append({"step": self.step, "sent_payload_bytes": [memoryview(f).nbytes for f in frames[1:]],
                            "received_shape": list(h2.shape)})
        self.step += 1
        return h2.to(hidden.dtype)

    def close(self) -> None:
        if self.step:
            s = self.agent.settings
            self.agent.send(Message(Kind.GENERATE_END, s.run_id, s.silo_id, self.round_no, self.step))
            self.step = 0


def generate_live(agent, round_no: int) -> None:
    """Complete the --generate prompts through the trunk; write --generate-out."""
    s = agent.settings
    tokenizer = load_tokenizer(resolve_model_dir(s.model))
    prompts = [ex.prompt for ex in load_jsonl(s.generate)]
    trunks: list[RemoteTrunk] = []

    def make_trunk() -> RemoteTrunk:
        trunks.append(RemoteTrunk(agent, round_no))
        return trunks[-1]

    texts = generate_texts(tokenizer, agent.head, agent.tail, make_trunk, prompts,
                           Sampling(max_new_tokens=s.max_new_tokens), s.batch_size, s.max_length)
    if s.generate_out is not None:
        doc = {"silo_id": s.silo_id, "texts": texts, "batch_size": s.batch_size,
               "hidden_size": agent.head.config.hidden_size, "generations": [t.frames for t in trunks]}
        s.generate_out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(s.generate_out, json.dumps(doc, indent=1).encode())
