"""Partition labelled examples over silos: IID, or label-skewed (non-IID).

* ``iid``: shuffle with the seed, deal round-robin (``splitfed.experiment.bbc.split_for_silos``): every silo
  sees every label in about the corpus's proportions, sizes differ by at most one.
* ``label_skew``: the usual Dirichlet label skew of the federated-learning literature (Hsu et al.
  2019, "Measuring the effects of non-identical data distribution"). For each label, the share of
  its examples that goes to each silo is drawn from Dirichlet(alpha, ..., alpha). Small alpha
  (0.1) gives silos dominated by one or two labels; large alpha (100) approaches IID. Draws are
  repeated (same seeded generator) until every silo holds at least ``min_size`` examples.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from splitfed.experiment.bbc import split_for_silos

T = TypeVar("T")
MAX_DRAWS = 1000


def iid_partition(examples: Sequence[T], n_silos: int, seed: int) -> list[list[T]]:
    return split_for_silos(examples, n_silos, seed)


def label_skew_partition(examples: Sequence[T], labels: Sequence[str], n_silos: int, alpha: float, seed: int,
                         min_size: int = 1) -> list[list[T]]:
    if len(examples) != len(labels):
        raise ValueError(f"{len(examples)} examples but {len(labels)} labels")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if n_silos < 1 or n_silos * min_size > len(examples):
        raise ValueError(f"cannot give {n_silos} silos {min_size} of {len(examples)} examples each")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for _ in range(MAX_DRAWS):
        silos: list[list[int]] = [[] for _ in range(n_silos)]
        for label in sorted(by_label):
            idx = list(by_label[label])
            rng.shuffle(idx)
            shares = rng.dirichlet([alpha] * n_silos)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for s, chunk in enumerate(np.split(np.array(idx), cuts)):
                silos[s].extend(int(i) for i in chunk)
        if min(len(s) for s in silos) >= min_size:
            order = random.Random(seed)
            for s in silos:
                order.shuffle(s)  # mix the labels inside each silo's file
            return [[examples[i] for i in s] for s in silos]
    raise ValueError(f"no label-skew draw with alpha={alpha} gave every silo {min_size} examples; raise alpha")


def label_counts(parts: Sequence[Sequence[str]]) -> list[dict[str, int]]:
    """Per silo, how many examples of each label it holds (for the report)."""
    return [{label: list(p).count(label) for label in sorted(set(p))} for p in parts]
