"""splitfed/audit/metrics.py: token recovery, BLEU-4 and ROUGE-L on cases with known answers."""

from __future__ import annotations

import pytest
import torch

from shared.data.tokenizer import byte_tokenizer
from splitfed.audit.metrics import bleu4, decode_rows, rouge_l, score_inversion, token_recovery


def test_token_recovery_counts_real_positions_only():
    target = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    guess = torch.tensor([[1, 2, 0, 0], [5, 0, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert token_recovery(guess, target, mask) == pytest.approx(100.0 * 3 / 6)
    assert token_recovery(target, target, mask) == 100.0


def test_token_recovery_refuses_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="shapes differ"):
        token_recovery(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="no real tokens"):
        token_recovery(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))


def test_bleu_and_rouge_bounds():
    refs = ["the bank raised its interest rates again on monday", "shares in the airline fell sharply"]
    assert bleu4(refs, refs) == pytest.approx(100.0)
    assert rouge_l(refs, refs) == pytest.approx(100.0)
    wrong = ["zebra quantum violet", "marmalade oxygen"]
    assert bleu4(wrong, refs) < 1.0
    assert rouge_l(wrong, refs) == 0.0
    half = ["the bank raised its", "shares in the airline"]
    assert 0.0 < rouge_l(half, refs) < 100.0
    with pytest.raises(ValueError, match="as many hypotheses"):
        bleu4(["a"], refs)


def test_score_inversion_decodes_real_tokens_only():
    tok = byte_tokenizer()
    first, second = b"the bank raised its rates again today", b"shares in the airline fell sharply"
    ids = torch.tensor([list(first), list(second + b"\x00" * (len(first) - len(second)))])
    mask = torch.ones_like(ids)
    mask[1, len(second):] = 0
    assert decode_rows(tok, ids, mask) == [first.decode(), second.decode()]
    perfect = score_inversion(tok, ids, ids, mask)
    assert (perfect.token_recovery, round(perfect.bleu4), round(perfect.rouge_l)) == (100.0, 100, 100)
    scrambled = score_inversion(tok, ids.flip(-1), ids, mask)
    assert scrambled.token_recovery < 30.0 and scrambled.bleu4 < 10.0
    assert set(perfect.to_json()) == {"token_recovery", "bleu4", "rouge_l"}
