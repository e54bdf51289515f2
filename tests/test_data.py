"""Silo data: JSONL parsing, label masking, padding, deterministic batches, the BBC corpus, tokenizers."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import processors

from splitfed.experiment import bbc
from shared.data.dataset import IGNORE_INDEX, DataError, Example, SiloDataset, collate, encode_example, epoch_seed, load_jsonl
from shared.data.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write(tmp_path: Path, content: str | bytes, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


# ------------------------------------------------------------------------------------- load_jsonl


def test_load_jsonl_both_forms_and_blank_lines(tmp_path):
    path = write(tmp_path, '{"prompt": "Q: 2+2?", "completion": " 4"}\n\n  \n{"text": "plain text"}\n')
    assert load_jsonl(path) == [Example("Q: 2+2?", " 4"), Example("", "plain text")]


def test_example_to_json_is_the_inverse_of_the_loader(tmp_path):
    records = [{"prompt": "p", "completion": "c"}, {"text": "t"}]
    path = write(tmp_path, "".join(json.dumps(r) + "\n" for r in records))
    assert [ex.to_json() for ex in load_jsonl(path)] == records


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('{"prompt": "a", "completion": "b"', "invalid JSON"),
    ('["prompt", "completion"]', "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
    ('{"prompt": "a"}', "missing field(s) completion"),
    ('{"completion": "b"}', "missing field(s) prompt"),
    ("{}", "missing field(s) completion, prompt"),
    ('{"prompt": "a", "completion": "b", "label": 1}', "unexpected field(s) label"),
    ('{"text": "a", "source": "web"}', "unexpected field(s) source"),
    ('{"text": "a", "prompt": "b"}', "unexpected field(s) text"),
    ('{"prompt": 1, "completion": "b"}', "field 'prompt' must be a string, got int"),
    ('{"prompt": "a", "completion": null}', "field 'completion' must be a string, got NoneType"),
    ('{"text": ["a"]}', "field 'text' must be a string, got list"),
    ('{"prompt": "a", "completion": ""}', "field 'completion' is empty"),
    ('{"text": ""}', "field 'text' is empty"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES)
def test_load_jsonl_names_file_line_and_problem(tmp_path, bad, message):
    path = write(tmp_path, '{"text": "fine"}\n\n' + bad + '\n{"text": "after"}\n')
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert f"{path}:3:" in str(info.value)
    assert message in str(info.value)


def test_load_jsonl_invalid_utf8(tmp_path):
    path = write(tmp_path, b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        load_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_load_jsonl_empty_file(tmp_path, content):
    path = write(tmp_path, content)
    with pytest.raises(DataError, match=rf"{path}: no examples \(the file is empty\)"):
        load_jsonl(path)


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read training data"):
        load_jsonl(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------------- encode_example


def test_prompt_is_masked_completion_and_eos_are_labelled(tok):
    ids, labels = encode_example(tok, Example("ab", "cd"), max_length=64)
    eos = tok.eos_token_id
    assert ids == [97, 98, 99, 100, eos]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, 99, 100, eos]


def test_text_example_is_labelled_everywhere(tok):
    ids, labels = encode_example(tok, Example("", "héllo"), max_length=64)
    assert ids == [*"héllo".encode(), tok.eos_token_id]
    assert labels == ids


def test_long_prompt_loses_its_left_end_and_keeps_the_completion(tok):
    ids, labels = encode_example(tok, Example("abcdef", "xy"), max_length=5)
    assert ids == [*b"efxy", tok.eos_token_id]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, *b"xy", tok.eos_token_id]


def test_completion_longer_than_max_length_keeps_its_start(tok):
    ids, labels = encode_example(tok, Example("prompt", "abcdefgh"), max_length=4)
    assert ids == labels == [*b"abcd"]


def test_special_prefix_of_a_bos_tokenizer_is_kept_and_masked():
    # A Llama-style tokenizer puts <bos> first (and here also <eos> last, which must not double).
    tok = byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", tok.bos_token_id), ("<eos>", tok.eos_token_id)])
    ids, labels = encode_example(tok, Example("abc", "d"), max_length=4)
    assert ids == [tok.bos_token_id, ord("c"), ord("d"), tok.eos_token_id]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, ord("d"), tok.eos_token_id]
    with pytest.raises(ValueError, match="no room"):
        encode_example(tok, Example("abc", "d"), max_length=1)


# ---------------------------------------------------------------------------------------- collate


def test_collate_pads_on_the_right(tok):
    pad = tok.pad_token_id
    batch = collate([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=pad)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, pad, pad]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert {t.dtype for t in (batch.input_ids, batch.attention_mask, batch.labels)} == {torch.long}


@pytest.mark.parametrize("encoded", [[], [([1, 2], [1])], [([], [])]])
def test_collate_rejects_bad_input(encoded):
    with pytest.raises(ValueError):
        collate(encoded, pad_id=0)


# ------------------------------------------------------------------------------------ SiloDataset


def examples(n: int) -> list[Example]:
    return [Example(f"question {i}?", f" answer {i * i}") for i in range(n)]


def dataset(tok, seed=0, silo_index=0, n=10, batch_size=3) -> SiloDataset:
    return SiloDataset(examples(n), tok, batch_size=batch_size, max_length=32, seed=seed, silo_index=silo_index)


def rows(batch) -> list[bytes]:
    """Each example's real tokens as bytes (the byte tokenizer's ids 0..255 are the bytes)."""
    return [bytes(ids[mask.bool()].tolist()[:-1]) for ids, mask in zip(batch.input_ids, batch.attention_mask)]


def test_same_arguments_give_equal_batches(tok):
    a, b = dataset(tok), dataset(tok)
    for step in [0, 1, 2, 3, 7, 100, 5, 0]:  # any order, across epochs
        x, y = a.batch(step), b.batch(step)
        for name in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(getattr(x, name), getattr(y, name))


def test_silo_index_and_seed_change_the_order(tok):
    first = [rows(dataset(tok).batch(s)) for s in range(3)]
    assert [rows(dataset(tok, silo_index=1).batch(s)) for s in range(3)] != first
    assert [rows(dataset(tok, seed=1).batch(s)) for s in range(3)] != first
    # seed + silo_index must not collide: (seed 1, silo 0) differs from (seed 0, silo 1)
    assert epoch_seed(1, 0, 0) != epoch_seed(0, 1, 0)


def test_epochs_drop_the_last_partial_batch_and_reshuffle(tok):
    ds = dataset(tok, n=10, batch_size=3)
    assert (len(ds), ds.num_examples, ds.batches_per_epoch) == (10, 10, 3)
    epoch0 = [r for s in range(3) for r in rows(ds.batch(s))]
    epoch1 = [r for s in range(3, 6) for r in rows(ds.batch(s))]
    assert len(set(epoch0)) == len(set(epoch1)) == 9  # no repeats within an epoch, one left out
    assert epoch0 != epoch1
    assert all(ds.batch(s).input_ids.shape[0] == 3 for s in range(12))


def test_dataset_rejects_bad_arguments(tok):
    with pytest.raises(ValueError, match="cannot fill one batch"):
        dataset(tok, n=2, batch_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        dataset(tok, batch_size=0)
    with pytest.raises(ValueError, match="step"):
        dataset(tok).batch(-1)


BATCH_DIGEST = """
import hashlib, sys
from shared.data.dataset import Example, SiloDataset
from shared.data.tokenizer import byte_tokenizer
examples = [Example(f"question {i}?", f" answer {i * i}") for i in range(10)]
ds = SiloDataset(examples, byte_tokenizer(), batch_size=3, max_length=32, seed=7, silo_index=2)
h = hashlib.sha256()
for step in range(8):
    b = ds.batch(step)
    for t in (b.input_ids, b.attention_mask, b.labels):
        h.update(t.numpy().tobytes())
print(h.hexdigest())
"""


def test_another_process_builds_byte_identical_batches(tok):
    # The silo process and the in-process reference must agree without sharing anything but
    # the arguments (Python's hash() salting, for one, would break this).
    ds = SiloDataset(examples(10), tok, batch_size=3, max_length=32, seed=7, silo_index=2)
    h = hashlib.sha256()
    for step in range(8):
        b = ds.batch(step)
        for t in (b.input_ids, b.attention_mask, b.labels):
            h.update(t.numpy().tobytes())
    out = subprocess.run([sys.executable, "-c", BATCH_DIGEST], cwd=REPO, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "random"})
    assert out.stdout.strip() == h.hexdigest()


# ---------------------------------------------------------------------------------------- BBC


@pytest.fixture(scope="module")
def articles():
    return bbc.bbc_articles()


def test_bbc_corpus_has_2225_articles_in_5_topics(articles):
    counts = collections.Counter(a.topic for a in articles)
    assert len(articles) == 2225
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401}
    assert all(a.title and a.body and "\n" not in a.title for a in articles)
    assert any("£" in a.body for a in articles if a.topic == "sport")  # the one cp1252 file decodes


def test_classification_example_format(articles):
    article = bbc.Article("sport", "Title here", "word " * 500)
    ex = bbc.to_classification_example(article, max_chars=100)
    assert ex["completion"] == " sport"
    assert ex["prompt"].startswith(
        "Classify the topic of this BBC news article (business, entertainment, politics, sport, tech).\n\n"
        "Article: Title here. word word")
    assert ex["prompt"].endswith("...\n\nTopic:")
    body = ex["prompt"].split("Title here. ")[1].split("\n\n")[0]
    assert len(body) <= 100 + 3
    with pytest.raises(ValueError, match="unknown topic"):
        bbc.to_classification_example(("sports", "t", "b"), 100)


def test_split_for_silos_is_an_iid_partition():
    items = list(range(103))
    parts = bbc.split_for_silos(items, 4, seed=3)
    assert sorted(x for p in parts for x in p) == items
    assert {len(p) for p in parts} == {25, 26}
    assert parts == bbc.split_for_silos(items, 4, seed=3)
    assert parts != bbc.split_for_silos(items, 4, seed=4)
    with pytest.raises(ValueError):
        bbc.split_for_silos(items, 0, seed=0)
    with pytest.raises(ValueError):
        bbc.split_for_silos([1], 2, seed=0)


def test_demo_file_is_balanced_small_and_valid():
    demo = bbc.demo_examples()
    assert len(demo) == 400
    assert collections.Counter(e["completion"] for e in demo) == {f" {t}": 80 for t in bbc.TOPICS}
    assert (REPO / "splitfed" / "experiment" / bbc.DEMO_RESOURCE).stat().st_size < 300_000
    assert len(set(e["prompt"] for e in demo)) == 400


def test_make_demo_reproduces_the_shipped_file(tmp_path):
    out = tmp_path / "demo.jsonl"
    assert bbc.main(["make-demo", "--out", str(out)]) == 0
    assert out.read_bytes() == (REPO / "splitfed" / "experiment" / bbc.DEMO_RESOURCE).read_bytes()


def test_demo_examples_tokenize_within_a_silo_budget(tok):
    # With the byte tokenizer and max_length 128 the prompt's start is cut, the label is kept.
    demo = [Example(**e) for e in bbc.demo_examples()[:20]]
    for ex in demo:
        ids, labels = encode_example(tok, ex, max_length=128)
        assert len(ids) == 128
        assert bytes(x for x in labels if x not in (IGNORE_INDEX, tok.eos_token_id)) == ex.completion.encode()


# -------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_any_text(tok):
    text = "Ünïcødé £5, emoji 🙂, tabs\tand\nnewlines, and a literal <eos> <pad>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # id == byte; specials in text stay bytes
    assert tok(text)["input_ids"] == ids  # nothing added by default
    assert tok.decode(ids) == text
    assert len(tok) == BYTE_VOCAB_SIZE <= 260
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok.padding_side == "right"
    assert tok.get_vocab() == byte_tokenizer().get_vocab()  # deterministic construction


def test_byte_tokenizer_survives_save_and_load_tokenizer(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "save me <eos> 🙂"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (256, 258, "right")


def test_load_tokenizer_falls_back_to_eos_and_right_padding(tmp_path):
    tok = byte_tokenizer()
    tok.pad_token = None
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token_id == loaded.eos_token_id == 258
    assert loaded.padding_side == "right"


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
