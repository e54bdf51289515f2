"""Task metrics of generated text against references: label accuracy and macro-F1, exact match, ROUGE-L.

Classification is done AS GENERATION: the model writes free text and a label is parsed out of it.
The parsing rule (``parse_label``): the label that starts a word earliest in the generated text,
case-insensitive ("Sports" and "sport-mad" name "sport", "Technology" names "tech", "esport" does
not); a tie at one place (one label a prefix of another) goes to the longer label. The rule is
deliberately lenient, so an untuned model that answers "Sports" is not marked wrong for the form.
Text naming no label is "unparsed": wrong for accuracy, and a miss (false negative) of its true
class for F1, never a class of its own.

Macro-F1 averages the per-label F1 over the labels that occur as truth or as prediction
(scikit-learn's default set of labels), with F1 = 0 where precision and recall are both 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rouge_score import rouge_scorer

UNPARSED = "<unparsed>"


def parse_label(text: str, labels: Sequence[str]) -> str:
    best: tuple[int, int, str] | None = None
    for label in labels:
        m = re.search(rf"(?<!\w){re.escape(label)}", text, flags=re.IGNORECASE)
        if m is not None:
            key = (m.start(), -len(label), label)
            best = key if best is None or key < best else best
    return UNPARSED if best is None else best[2]


def classification_metrics(predictions: Sequence[str], truths: Sequence[str]) -> dict:
    """Accuracy and macro-F1 in percent, and per-label precision/recall/F1/support."""
    if len(predictions) != len(truths) or not truths:
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} truths")
    correct = sum(p == t for p, t in zip(predictions, truths))
    labels = sorted({*truths, *predictions} - {UNPARSED})
    per_label = {}
    for label in labels:
        tp = sum(p == label and t == label for p, t in zip(predictions, truths))
        fp = sum(p == label and t != label for p, t in zip(predictions, truths))
        fn = sum(p != label and t == label for p, t in zip(predictions, truths))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    macro_f1 = sum(v["f1"] for v in per_label.values()) / len(per_label) if per_label else 0.0
    return {"accuracy": 100.0 * correct / len(truths), "macro_f1": 100.0 * macro_f1,
            "unparsed": sum(p == UNPARSED for p in predictions), "per_label": per_label}


def normalize(text: str) -> str:
    """Case and whitespace do not count for exact match."""
    return " ".join(text.split()).lower()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percent of predictions equal to their reference after ``normalize``."""
    return 100.0 * sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure in percent (Google's rouge-score, no stemming)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return 100.0 * sum(scores) / len(scores)
