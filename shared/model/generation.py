"""Split generation: the prompt once, then one token at a time, each part keeping its own KV cache.

    prompt ids -> head -> h1 ==> trunk -> h2 ==> tail -> logits[:, -1] -> next token
    next token -> head (cache) -> h1[:, 1 position] ==> trunk (cache) -> h2[:, 1] ==> tail (cache) -> ...

Head, trunk and tail each hold the keys and values of their own layers (``PartSession``), so after
the prompt only the new position's hidden state, mask column and position id cross between parts.
The trunk is a pluggable callable (``TrunkStep``): ``LocalTrunk`` runs an in-process TrunkPart;
the silo agent's remote client sends the same three tensors through the broker instead.

Prompts are LEFT-padded (``encode_prompts``): every row then ends at the last column, so the new
token of every row is appended at the same place and its position is the row's last position + 1.
Token ids never leave the silo: the head embeds them, the tail turns hidden states into logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from shared.data.dataset import special_prefix
from shared.model.model_split import HeadPart, TailPart, TrunkPart, positions_from_mask


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy; otherwise seeded top-p sampling."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class PartSession:
    """One part's side of one generation: its KV cache and the 2-D mask of every key it holds.

    Each call takes only the NEW positions (hidden or ids, their mask columns and position ids),
    appends their mask columns to the history, and runs the part against its cache.
    """

    def __init__(self, part: HeadPart | TrunkPart | TailPart) -> None:
        self.part = part
        self.cache = None
        self.mask: torch.Tensor | None = None

    @property
    def seen(self) -> int:
        """Positions (keys) this session holds, prefix not counted."""
        return 0 if self.mask is None else self.mask.shape[1]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.cache = self.part.new_cache(x.shape[0])
        elif x.shape[0] != self.mask.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} rows, the session holds {self.mask.shape[0]}")
        mask = mask.to(torch.long)
        self.mask = mask if self.mask is None else torch.cat([self.mask, mask], dim=1)
        return self.part(x, self.mask, positions.to(torch.long), cache=self.cache)


class TrunkStep(Protocol):
    """The trunk's side of one generation: called with the new positions' h1, returns their h2."""

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None:
        """The generation is over: free the trunk's cache."""


class LocalTrunk:
    """A TrunkPart in this process (tests, evaluation, the reference for the remote trunk)."""

    def __init__(self, trunk: TrunkPart) -> None:
        self.session = PartSession(trunk)

    def __call__(self, hidden, mask, positions):
        return self.session(hidden, mask, positions)

    def close(self) -> None:
        self.session = PartSession(self.session.part)


def choose_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Next token per row from the last position's logits [B, V]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always the top one).
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= sampling.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    # Drawn on the CPU from a seeded generator: the same tokens on every machine.
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def split_generate(
    head: HeadPart,
    tail: TailPart,
    trunk: TrunkStep,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: Sampling,
    eos_token_id: int,
    pad_token_id: int,
) -> torch.Tensor:
    """New tokens [B, n <= max_new_tokens] for left-padded prompts; after a row's EOS, pad ids.

    The trunk's cache is freed (``trunk.close()``) however the generation ends.
    """
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"mask {tuple(attention_mask.shape)} != ids {tuple(input_ids.shape)}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded (every row's last column a real token)")
    generator = torch.Generator().manual_seed(sampling.seed)
    head_s, tail_s = PartSession(head), PartSession(tail)
    ids, mask = input_ids, attention_mask.to(torch.long)
    positions = positions_from_mask(mask)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    out = []
    try:
        for _ in range(sampling.max_new_tokens):
            h1 = head_s(ids, mask, positions)
            h2 = trunk(h1, mask, positions)
            logits = tail_s(h2.to(h1.dtype), mask, positions)[:, -1, :]
            token = choose_next(logits, sampling, generator)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            out.append(token)
            finished |= token == eos_token_id
            if bool(finished.all()):
                break
            # Only the new position from here on: one token, one mask column, one position.
            ids, mask, positions = token[:, None], torch.ones_like(token)[:, None], positions[:, -1:] + 1
    finally:
        trunk.close()
    return torch.stack(out, dim=1)


# ---- prompts in, texts out ----------------------------------------------------------------------


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, each prompt laid out as in training: [special prefix] prompt.

    A prompt longer than ``max_prompt_tokens`` loses tokens from its left, as training does.
    """
    prefix = special_prefix(tokenizer)
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        room = max(max_prompt_tokens - len(prefix), 0)
        rows.append(prefix + ids[len(ids) - room:] if len(ids) > room else prefix + ids)
    if any(not r for r in rows):
        raise ValueError("an empty prompt with a tokenizer that adds no special prefix has nothing to continue")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return input_ids, mask


def decode_new_tokens(tokenizer, tokens: torch.Tensor) -> list[str]:
    """Each row's new tokens up to (not including) its first EOS, as text."""
    texts = []
    for row in tokens.tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def generate_texts(tokenizer, head: HeadPart, tail: TailPart, make_trunk, prompts: Sequence[str],
                   sampling: Sampling, batch_size: int = 8, max_prompt_tokens: int = 512) -> list[str]:
    """Completions of ``prompts`` in batches; ``make_trunk()`` gives a fresh TrunkStep per batch."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[start:start + batch_size], max_prompt_tokens)
        tokens = split_generate(head, tail, make_trunk(), ids, mask, sampling,
                                tokenizer.eos_token_id, tokenizer.pad_token_id)
        out.extend(decode_new_tokens(tokenizer, tokens))
    return out
