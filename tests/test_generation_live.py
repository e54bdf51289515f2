"""Split generation through the live pipeline: broker, trunk worker and silo as real processes.

The silo trains two steps, then completes prompts through the trunk (GENERATE frames, sealed end to
end). The texts must equal local split generation with the very adapters both sides saved, and the
payload frames actually sent must hold the whole prompt once, then exactly one position per token.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from shared.crypto import keys as keystore

from shared.crypto import enrollment
from shared.model.adapter_files import load_split_adapters
from shared.model.adapters import AdapterConfig
from shared.model.generation import LocalTrunk, Sampling, generate_texts
from shared.model.models import resolve_model_dir
from shared.wire.protocol import SEAL_OVERHEAD
from shared.state.registry import Registry
from shared.data.tokenizer import load_tokenizer
from splitfed.evaluation.trained_parts import load_split_model
from tests.conftest import REDIS_URL
from tests.test_processes import _free_port, _start, role_env

pytestmark = pytest.mark.slow
PROMPTS = ["Item 3:", "A much longer prompt, item 12:", "Item 7:", "Last one:"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache-gen")
    old = os.environ.get("SPLITFED_CACHE_DIR")
    os.environ["SPLITFED_CACHE_DIR"] = str(cache)
    try:
        yield resolve_model_dir("tiny")
    finally:
        if old is None:
            os.environ.pop("SPLITFED_CACHE_DIR", None)
        else:
            os.environ["SPLITFED_CACHE_DIR"] = old


@pytest.mark.parametrize("mode", ["serial", "hierarchical"])  # hierarchical: the silo's own trunk adapter
def test_live_generation_equals_local_split_generation_and_sends_one_position_per_token(redis_prefix, tiny_dir, tmp_path,
                                                                                       mode):
    run_id = "genlive"
    registry = Registry(REDIS_URL, redis_prefix, run_id)
    registry.create_run({"mode": mode, "silos": "silo0", "local_steps": 2})
    front, back = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    env = role_env(redis_prefix, run_id, tiny_dir.parent.parent)
    trunk_keys = keystore.generate_trunk_keys(tmp_path / "trunk-keys")
    silo_keys = keystore.generate_silo_keys(tmp_path / "silo-keys")
    enrollment.enroll(registry, "silo0", silo_keys.identity_public, silo_keys.x25519_public)
    data, prompts, out = tmp_path / "train.jsonl", tmp_path / "prompts.jsonl", tmp_path / "generated.json"
    data.write_text("".join(json.dumps({"prompt": f"Item {i}:", "completion": f" answer {i % 3}"}) + "\n" for i in range(8)))
    prompts.write_text("".join(json.dumps({"prompt": p, "completion": " ?"}) + "\n" for p in PROMPTS))
    weights = tmp_path / "weights"
    procs = [
        _start(["broker", "--frontend-bind", front, "--backend-bind", back, "--mode", mode], env, tmp_path / "broker.log"),
        _start(["trunk", "--broker-backend", back, "--keys-dir", str(tmp_path / "trunk-keys"), "--save-dir", str(weights),
                "--mode", mode], env, tmp_path / "trunk.log"),
    ]
    try:
        silo = _start(["silo", "--broker-frontend", front, "--silo-id", "silo0", "--data", str(data), "--steps", "2",
                       "--local-steps", "2", "--batch-size", "3", "--max-length", "32", "--save-dir", str(weights),
                       "--keys-dir", str(tmp_path / "silo-keys"), "--trunk-fingerprint", trunk_keys.fingerprint,
                       "--generate", str(prompts), "--generate-out", str(out), "--max-new-tokens", str(MAX_NEW)],
                      env, tmp_path / "silo0.log")
        assert silo.wait(timeout=300) == 0, (tmp_path / "silo0.log").read_text()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    assert all(p.returncode == 0 for p in procs), (tmp_path / "trunk.log").read_text()[-2000:]
    doc = json.loads(out.read_text())

    # the same texts as local split generation with the adapters both sides trained and saved
    cfg = AdapterConfig(kind="lora")
    trunk_file = weights / ("trunk-silo0.safetensors" if mode == "hierarchical" else "trunk.safetensors")
    local = load_split_model(tiny_dir, cfg, load_split_adapters(weights / "silo0.safetensors", trunk_file, cfg))
    tokenizer = load_tokenizer(tiny_dir)
    expected = generate_texts(tokenizer, local.head, local.tail, lambda: LocalTrunk(local.trunk), PROMPTS,
                              Sampling(max_new_tokens=MAX_NEW), batch_size=3, max_prompt_tokens=32)
    assert doc["texts"] == expected
    assert any(doc["texts"])

    # frame sizes: the prompt once (B x T positions), then one position per row and new token
    hidden = doc["hidden_size"]
    assert [len(g) for g in doc["generations"]] and len(doc["generations"]) == 2  # batches of 3 and 1
    for gen in doc["generations"]:
        first = gen[0]
        b, t = first["received_shape"][:2]
        assert first["sent_payload_bytes"] == [b * t * hidden * 4 + SEAL_OVERHEAD, b * t + SEAL_OVERHEAD,
                                               b * t * 4 + SEAL_OVERHEAD]
        assert t > 1
        for later in gen[1:]:
            assert later["sent_payload_bytes"] == [b * hidden * 4 + SEAL_OVERHEAD, b + SEAL_OVERHEAD, 4 * b + SEAL_OVERHEAD]
            assert later["received_shape"] == [b, 1, hidden]
        assert 1 <= len(gen) <= MAX_NEW
    assert registry.rejected() == {}
    trunk_log = (tmp_path / "trunk.log").read_text()
    assert "Traceback" not in trunk_log
