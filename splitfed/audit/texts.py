"""The texts of the audit: a silo's private BBC articles (victims) and the attacker's shadow text.

The two never share an article: victims come from ``VICTIM_TOPICS``, the shadow text from the
other topics (public news the attacker can get, but not the silo's own domain). Each text is the
article's title and body, cut into windows of ``max_tokens`` tokens (victims: the first window of
each article; shadow: every full window, for more training data per article).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from splitfed.experiment.bbc import bbc_articles

VICTIM_TOPICS = ("business", "politics")


@dataclass(frozen=True)
class TokenWindows:
    input_ids: torch.Tensor  # [N, T] long, right-padded
    attention_mask: torch.Tensor  # [N, T] long


def _unique_articles(topics_in: bool, seed: int) -> list[str]:
    seen, texts = set(), []
    for a in bbc_articles():
        if (a.topic in VICTIM_TOPICS) == topics_in and (a.title, a.body) not in seen:
            seen.add((a.title, a.body))
            texts.append(f"{a.title}. {' '.join(a.body.split())}")
    random.Random(seed).shuffle(texts)
    return texts


def windows(tokenizer, texts: list[str], max_tokens: int, limit: int, every_window: bool) -> TokenWindows:
    """Up to ``limit`` windows of ``max_tokens`` ids from ``texts`` (a short text is padded)."""
    if max_tokens < 2 or limit < 1:
        raise ValueError(f"need max_tokens >= 2 and limit >= 1, got {max_tokens} and {limit}")
    rows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        starts = range(0, max(len(ids) - max_tokens + 1, 1), max_tokens) if every_window else [0]
        rows.extend(ids[s:s + max_tokens] for s in starts)
        if len(rows) >= limit:
            break
    rows = [r for r in rows[:limit] if r]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), max_tokens), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), max_tokens), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return TokenWindows(input_ids, mask)


def victim_windows(tokenizer, n_texts: int, max_tokens: int, seed: int) -> TokenWindows:
    """The first ``max_tokens`` tokens of ``n_texts`` private articles of the silo's topics."""
    return windows(tokenizer, _unique_articles(True, seed), max_tokens, n_texts, every_window=False)


def shadow_windows(tokenizer, n_windows: int, max_tokens: int, seed: int) -> TokenWindows:
    """``n_windows`` windows of the attacker's public text (articles of the other topics)."""
    return windows(tokenizer, _unique_articles(False, seed), max_tokens, n_windows, every_window=True)
