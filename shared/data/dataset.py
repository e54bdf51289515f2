"""A silo's training data: JSONL parsing, tokenization with label masking, padding, batching.

Everything here runs inside the silo: token ids and labels never leave it. The batch order is a
pure function of (seed, silo_index, step), so a silo process and an in-process reference run
build byte-identical batches without talking to each other.

JSONL format, one object per line (blank lines are skipped):

    {"prompt": "...", "completion": "..."}   loss on the completion tokens only
    {"text": "..."}                          loss on every token

Labels are aligned with ``input_ids`` (not shifted): the loss shifts them, as transformers does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

IGNORE_INDEX = -100  # what torch's cross_entropy skips


class DataError(ValueError):
    """A training file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One training example. A plain-text example is a completion with an empty prompt."""

    prompt: str
    completion: str

    def to_json(self) -> dict[str, str]:
        """The JSONL record this example parses from (inverse of the loader)."""
        if self.prompt == "":
            return {"text": self.completion}
        return {"prompt": self.prompt, "completion": self.completion}


# ---------------------------------------------------------------------------------------- parsing


def load_jsonl(path: str | Path) -> list[Example]:
    """Parse and validate a JSONL training file; the first bad line raises DataError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read training data: {e.strerror or e}") from e
    examples = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if line.strip():
            examples.append(_parse_line(line, f"{path}:{lineno}"))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def _parse_line(line: bytes, where: str) -> Example:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if keys == {"text"}:
        text = _string_field(record, "text", where)
        if not text:
            raise DataError(f"{where}: field 'text' is empty")
        return Example(prompt="", completion=text)
    if keys == {"prompt", "completion"}:
        prompt = _string_field(record, "prompt", where)
        completion = _string_field(record, "completion", where)
        if not completion:
            raise DataError(f"{where}: field 'completion' is empty (nothing to learn)")
        return Example(prompt=prompt, completion=completion)
    # Name exactly what is wrong: the two forms share no key, so guess the intended one.
    form = {"text"} if "text" in keys and not keys & {"prompt", "completion"} else {"prompt", "completion"}
    missing, extra = sorted(form - keys), sorted(keys - form)
    problems = ([f"missing field(s) {', '.join(missing)}"] if missing else []) + (
        [f"unexpected field(s) {', '.join(extra)}"] if extra else [])
    raise DataError(f"{where}: {'; '.join(problems)} "
                    '(expected {"prompt": str, "completion": str} or {"text": str})')


def _string_field(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------- tokenizing


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before text (a BOS for Llama-style ones, none for GPT-2,
    SmolLM2 or the byte tokenizer), so fine-tuning inputs start the way pretraining inputs did.
    Whatever it would append (some add EOS) is ignored: ``encode_example`` appends EOS itself."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def encode_example(tokenizer, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example, at most ``max_length`` tokens.

    Layout: [special prefix] prompt completion <eos>; labels are -100 on the prefix and prompt and
    the ids themselves on completion and EOS. Prompt and completion are tokenized separately so
    the label boundary is exact. When too long, the prompt loses tokens from its left (the end
    of a prompt is what the completion follows from); if the completion alone does not fit, it
    keeps its first tokens and loses the EOS.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    prefix = special_prefix(tokenizer)
    if max_length <= len(prefix):
        raise ValueError(f"max_length={max_length} leaves no room after {len(prefix)} special token(s)")
    prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
    target = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    room = max_length - len(prefix)
    target = target[:room]
    prompt = prompt[len(prompt) - (room - len(target)):] if len(prompt) + len(target) > room else prompt

    input_ids = prefix + prompt + target
    labels = [IGNORE_INDEX] * (len(prefix) + len(prompt)) + target
    return input_ids, labels


# ------------------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """One padded batch: all [B, T] tensors, right-padded, attention_mask 1 on real tokens."""

    input_ids: torch.Tensor  # long
    attention_mask: torch.Tensor  # long, 1 real / 0 pad
    labels: torch.Tensor  # long, -100 on prompt and pad


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-pad (ids, labels) pairs to the longest one.

    Right padding keeps every sequence starting at position 0, so positions derived from the
    mask equal those of the unpadded sequence and causal attention never needs to skip a gap.
    """
    if not encoded:
        raise ValueError("cannot collate an empty batch")
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        if len(ids) != len(labs) or not ids:
            raise ValueError(f"example {row}: {len(ids)} ids and {len(labs)} labels (need equal, non-zero)")
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(labs, dtype=torch.long)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def epoch_seed(seed: int, silo_index: int, epoch: int) -> int:
    """A 63-bit seed mixing the three numbers through a hash.

    Python's hash() is salted per process, and seed + silo_index collides (seed 1 silo 0 equals
    seed 0 silo 1), so a fixed-width blake2b digest it is: equal in every process and platform.
    """
    digest = hashlib.blake2b(f"splitfed-data/{seed}/{silo_index}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SiloDataset:
    """A silo's examples, tokenized once, served as deterministic batches by step number.

    Epoch e visits the examples in ``torch.randperm`` order from a generator seeded with
    ``epoch_seed(seed, silo_index, e)``; step k is batch ``k % batches_per_epoch`` of epoch
    ``k // batches_per_epoch``. The last incomplete batch of an epoch is dropped (every step has
    exactly ``batch_size`` examples, which client-batch mode and sample-weighted averaging rely
    on); the next epoch's new order lets those examples come round again.
    """

    def __init__(self, examples: Sequence[Example], tokenizer, batch_size: int, max_length: int,
                 seed: int, silo_index: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} examples cannot fill one batch of {batch_size}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (use shared.data.tokenizer.load_tokenizer)")
        self.batch_size = batch_size
        self.seed = seed
        self.silo_index = silo_index
        self.pad_id = tokenizer.pad_token_id
        self.encoded = [encode_example(tokenizer, ex, max_length) for ex in examples]
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation): steps go in order

    @property
    def num_examples(self) -> int:
        """Sample count, the weight of this silo in sample-weighted averaging."""
        return len(self.encoded)

    def __len__(self) -> int:
        return self.num_examples

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.silo_index, epoch))
            self._order = (epoch, torch.randperm(self.num_examples, generator=gen).tolist())
        return self._order[1]

    def batch(self, step: int) -> Batch:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, k = divmod(step, self.batches_per_epoch)
        picks = self.epoch_order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        return collate([self.encoded[i] for i in picks], self.pad_id)
