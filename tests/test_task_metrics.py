"""Task metrics and silo partitions: hand-computed values, documented parsing rules, bad input."""

from __future__ import annotations

from collections import Counter

import pytest

from splitfed.experiment.partition import iid_partition, label_counts, label_skew_partition
from splitfed.evaluation.task_metrics import UNPARSED, classification_metrics, exact_match, parse_label, rouge_l

LABELS = ["business", "sport", "tech", "entertainment"]


@pytest.mark.parametrize("text,label", [
    (" Sport", "sport"),
    ("It is about TECH and business", "tech"),  # the earliest occurrence wins
    ("Sports news", "sport"),  # a label starting a word counts: "Sports", "Technology"
    ("Technology", "tech"),
    ("esports and biotech", UNPARSED),  # inside a word it does not
    ("business-tech", "business"),
    ("nothing here", UNPARSED),
    ("", UNPARSED),
])
def test_parse_label(text, label):
    assert parse_label(text, LABELS) == label


def test_parse_label_prefers_the_longer_label_at_the_same_place():
    assert parse_label("new york times", ["new", "new york"]) == "new york"


def test_classification_metrics_by_hand():
    truths = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", UNPARSED, "c"]
    m = classification_metrics(preds, truths)
    assert m["accuracy"] == pytest.approx(60.0)
    # a: P 1 R 0.5 F1 2/3; b: P 0.5 R 0.5 F1 0.5; c: F1 1 -> macro (2/3 + 1/2 + 1) / 3
    assert m["macro_f1"] == pytest.approx(100 * (2 / 3 + 0.5 + 1) / 3)
    assert m["unparsed"] == 1 and m["per_label"]["b"]["support"] == 2
    with pytest.raises(ValueError):
        classification_metrics(["a"], ["a", "b"])


def test_exact_match_and_rouge_l():
    assert exact_match(["  The  Cat ", "dog"], ["the cat", "cat"]) == 50.0
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    # LCS 3 of prediction 3 / reference 5 tokens: P 1, R 0.6 -> F 0.75
    assert rouge_l(["the cat sat"], ["the cat sat on it"]) == pytest.approx(75.0)


def test_iid_partition_sizes_and_coverage():
    parts = iid_partition(list(range(10)), 3, seed=1)
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert sorted(x for p in parts for x in p) == list(range(10))


def test_label_skew_partition_is_seeded_complete_and_skewed():
    labels = [t for t in "abcde" for _ in range(40)]
    examples = list(range(len(labels)))
    parts = label_skew_partition(examples, labels, 4, alpha=0.1, seed=3, min_size=4)
    assert parts == label_skew_partition(examples, labels, 4, alpha=0.1, seed=3, min_size=4)
    assert sorted(x for p in parts for x in p) == examples
    assert min(len(p) for p in parts) >= 4
    # strongly skewed: each silo's most common label holds far more than the IID fifth
    shares = [Counter(labels[i] for i in p).most_common(1)[0][1] / len(p) for p in parts]
    assert max(shares) > 0.5
    near_iid = label_skew_partition(examples, labels, 4, alpha=1000.0, seed=3)
    assert all(abs(c - 10) <= 3 for counts in label_counts([[labels[i] for i in p] for p in near_iid])
               for c in counts.values())
    with pytest.raises(ValueError, match="alpha"):
        label_skew_partition(examples, labels, 4, alpha=0, seed=3)
    with pytest.raises(ValueError, match="cannot give"):
        label_skew_partition(examples, labels, 300, alpha=1, seed=3)
