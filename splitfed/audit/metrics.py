"""How much of the private text came back: token recovery rate, BLEU-4 and ROUGE-L, all in percent.

Token recovery compares ids position by position over the real (unpadded) tokens: the attacker
knows the positions (the mask crosses the wire), so a token is recovered when its guess is exact.
BLEU-4 (sacrebleu, corpus level) and ROUGE-L (rouge-score, F-measure, mean over texts) score the
decoded reconstructions against the decoded originals, as the FL-GLM paper's Table 3 does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class InversionScores:
    token_recovery: float  # % of real tokens recovered exactly at their position
    bleu4: float  # corpus BLEU-4, 0..100
    rouge_l: float  # mean ROUGE-L F-measure, 0..100

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in asdict(self).items()}


def token_recovery(predicted: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """% of positions with mask 1 where ``predicted`` equals ``target`` ([B, T] each)."""
    if predicted.shape != target.shape or target.shape != attention_mask.shape:
        raise ValueError(f"shapes differ: predicted {tuple(predicted.shape)}, target {tuple(target.shape)}, "
                         f"mask {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    n = int(real.sum())
    if n == 0:
        raise ValueError("no real tokens to score")
    return 100.0 * float((predicted.eq(target) & real).sum()) / n


def bleu4(hypotheses: list[str], references: list[str]) -> float:
    from sacrebleu.metrics import BLEU

    _check_pairs(hypotheses, references)
    return float(BLEU(max_ngram_order=4).corpus_score(hypotheses, [references]).score)


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    _check_pairs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return 100.0 * sum(scores) / len(scores)


def _check_pairs(hypotheses: list[str], references: list[str]) -> None:
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need as many hypotheses as references (>= 1), got {len(hypotheses)} and {len(references)}")


def decode_rows(tokenizer, ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """Each row's real tokens as text (pads dropped by the mask, not by id: a guess may be a pad id)."""
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=False)
            for row, m in zip(ids, attention_mask)]


def score_inversion(tokenizer, predicted: torch.Tensor, target: torch.Tensor,
                    attention_mask: torch.Tensor) -> InversionScores:
    hyps = decode_rows(tokenizer, predicted, attention_mask)
    refs = decode_rows(tokenizer, target, attention_mask)
    return InversionScores(token_recovery(predicted, target, attention_mask), bleu4(hyps, refs), rouge_l(hyps, refs))
