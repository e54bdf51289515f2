"""The BBC News task of the experiment: a held-out split, a training pool, and its silo partition.

Per topic, the distinct articles (duplicates dropped) are shuffled with the seed; the first
``eval_per_topic`` are held out, the next ``train_per_topic`` (or all the rest) are the training
pool. Held-out articles are balanced across topics, so accuracy is not a majority-class artefact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from splitfed.experiment.bbc import to_classification_example, unique_articles_by_topic, write_jsonl
from splitfed.experiment.partition import iid_partition, label_counts, label_skew_partition
from splitfed.experiment.presets import Preset

PARTITIONS = ("iid", "label-skew")


@dataclass
class TaskData:
    train: list[dict]
    heldout: list[dict]
    silos: list[list[dict]]
    silo_paths: list[Path]
    union_path: Path
    heldout_path: Path

    def summary(self) -> dict:
        return {"train": len(self.train), "heldout": len(self.heldout),
                "silo_label_counts": label_counts([[r["completion"].strip() for r in s] for s in self.silos])}


def build_task(preset: Preset, partition: str, alpha: float, out_dir: Path) -> TaskData:
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    rng = random.Random(preset.seed)
    train, heldout = [], []
    for topic, articles in unique_articles_by_topic().items():
        articles = list(articles)
        rng.shuffle(articles)
        if len(articles) <= preset.eval_per_topic:
            raise ValueError(f"topic {topic} has {len(articles)} articles, cannot hold out {preset.eval_per_topic}")
        heldout += articles[:preset.eval_per_topic]
        rest = articles[preset.eval_per_topic:]
        train += rest if preset.train_per_topic is None else rest[:preset.train_per_topic]
    rng.shuffle(train)
    rng.shuffle(heldout)
    train_records = [to_classification_example(a, preset.max_chars) for a in train]
    heldout_records = [to_classification_example(a, preset.max_chars) for a in heldout]
    if partition == "iid":
        silos = iid_partition(train_records, preset.silos, preset.seed)
    else:
        silos = label_skew_partition(train_records, [a.topic for a in train], preset.silos, alpha, preset.seed,
                                     min_size=preset.batch_size)
    data_dir = out_dir / "data"
    silo_paths = [data_dir / f"silo{i}.jsonl" for i in range(preset.silos)]
    for records, path in zip(silos, silo_paths):
        write_jsonl(records, path)
    write_jsonl(train_records, data_dir / "union.jsonl")
    write_jsonl(heldout_records, data_dir / "heldout.jsonl")
    return TaskData(train_records, heldout_records, silos, silo_paths, data_dir / "union.jsonl",
                    data_dir / "heldout.jsonl")
