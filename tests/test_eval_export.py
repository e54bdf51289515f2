"""`splitfed eval` and `splitfed export` on a tiny model: the exported PEFT adapter in plain
transformers generates exactly what split generation does, and every source evaluates alike."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from shared.model.adapter_files import adapter_metadata, load_split_adapters, save_adapter_file
from shared.model.adapters import AdapterConfig, adapter_state_dict, apply_adapter
from shared.model.generation import LocalTrunk, Sampling, encode_prompts, split_generate
from shared.model.part_loading import build_part, build_silo_parts
from shared.model.tiny_models import make_tiny_model_dir
from shared.data.tokenizer import byte_tokenizer
from splitfed.evaluation.trained_parts import load_split_model
from splitfed.cli import main

LORA = AdapterConfig(kind="lora", lora_r=4, lora_alpha=8, lora_init_b="random")
PROMPTS = [f"Question {i}: what is {i} + {2 * i}? Answer:" for i in range(24)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with its byte tokenizer, and a split run's two adapter files (non-trivial LoRA)."""
    root = tmp_path_factory.mktemp("tiny-export")
    model_dir = make_tiny_model_dir(root / "model", "llama", seed=5)
    byte_tokenizer().save_pretrained(model_dir)
    head, tail = build_silo_parts(model_dir)
    trunk = build_part(model_dir, "trunk")
    for part in (head, tail, trunk):
        apply_adapter(part, LORA, seed=11)
    silo_file, trunk_file = root / "silo0.safetensors", root / "trunk.safetensors"
    # as the silo agent writes it (no header), and as the trunk worker does (with its settings)
    save_file({k: v.contiguous() for k, v in {**adapter_state_dict(head), **adapter_state_dict(tail)}.items()},
              str(silo_file))
    save_adapter_file(trunk_file, adapter_state_dict(trunk), adapter_metadata(LORA, "trunk"))
    data = root / "heldout.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": " yes" if i % 2 else " no"}) + "\n"
                            for i, p in enumerate(PROMPTS[:10])))
    return {"model": model_dir, "silo": silo_file, "trunk": trunk_file, "data": data, "root": root}


def _split_args(tiny) -> list[str]:
    return ["--model", str(tiny["model"]), "--silo-weights", str(tiny["silo"]), "--trunk-weights", str(tiny["trunk"]),
            "--lora-r", "4", "--lora-alpha", "8"]


def _run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_exported_adapter_in_plain_transformers_generates_what_split_generation_does(tiny, tmp_path):
    out = tmp_path / "peft"
    r = _run(["export", *_split_args(tiny), "--out", str(out), "--silo-id", "silo0"])
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert "split federated learning" in (out / "README.md").read_text()

    tok = byte_tokenizer()
    ids, mask = encode_prompts(tok, PROMPTS, max_prompt_tokens=64)
    sampling = Sampling(max_new_tokens=10)
    split = load_split_model(tiny["model"], LORA, load_split_adapters(tiny["silo"], tiny["trunk"], LORA))
    ours = split_generate(split.head, split.tail, LocalTrunk(split.trunk), ids, mask, sampling,
                          tok.eos_token_id, tok.pad_token_id)

    base = AutoModelForCausalLM.from_pretrained(tiny["model"])
    peft_model = PeftModel.from_pretrained(base, out).eval()
    theirs = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    assert len(PROMPTS) >= 20 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    with peft_model.disable_adapter():  # the adapter matters: without it the tokens differ
        plain = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    assert not torch.equal(ours, plain)


def test_eval_gives_the_same_predictions_from_split_files_and_from_the_export(tiny, tmp_path):
    out = tmp_path / "peft"
    assert _run(["export", *_split_args(tiny), "--out", str(out)]).exit_code == 0
    common = ["eval", "--data", str(tiny["data"]), "--task", "classification", "--max-new-tokens", "4"]
    split_json, peft_json, base_json = tmp_path / "split.json", tmp_path / "peft.json", tmp_path / "base.json"
    assert _run([*common, *_split_args(tiny), "--json", str(split_json)]).exit_code == 0
    r = _run([*common, "--model", str(tiny["model"]), "--peft-dir", str(out), "--json", str(peft_json)])
    assert r.exit_code == 0, r.output
    assert _run([*common, "--model", str(tiny["model"]), "--json", str(base_json)]).exit_code == 0
    split, peft, base = (json.loads(p.read_text()) for p in (split_json, peft_json, base_json))
    for key in ("accuracy", "macro_f1", "exact_match", "rouge_l", "perplexity"):
        assert key in split
    assert [p["generated"] for p in split["predictions"]] == [p["generated"] for p in peft["predictions"]]
    assert split["perplexity"] == pytest.approx(peft["perplexity"], rel=1e-5)
    assert split["perplexity"] != pytest.approx(base["perplexity"], rel=1e-3)
    assert 1.0 < base["perplexity"] < 1e4 and split["examples"] == 10


def test_bad_input_gives_clear_errors(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    r = CliRunner().invoke(main, ["eval", "--data", str(bad), "--model", str(tiny["model"])])
    assert r.exit_code == 1 and "missing field(s) completion" in r.output
    r = CliRunner().invoke(main, ["eval", "--data", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = CliRunner().invoke(main, ["eval", "--data", str(tiny["data"]), "--model", str(tiny["model"]),
                                  "--silo-weights", str(tiny["silo"])])
    assert r.exit_code == 2 and "both --silo-weights and --trunk-weights" in r.output
    # the trunk file says r=4: another r is refused before anything loads
    r = CliRunner().invoke(main, ["export", *_split_args(tiny)[:-4], "--lora-r", "8", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "lora_r=4" in r.output
    r = CliRunner().invoke(main, ["eval", "--data", str(tiny["data"]), "--model", str(tiny["model"]),
                                  "--peft-dir", str(tmp_path)])
    assert r.exit_code == 1 and "not a PEFT adapter directory" in r.output
    r = CliRunner().invoke(main, ["eval", "--data", str(tiny["data"]), "--model", str(tmp_path / "no-model")])
    assert r.exit_code == 1 and "not one of 'smollm2', 'gemma3', 'qwen2.5-coder-0.5b' nor a directory" in r.output
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    r = CliRunner().invoke(main, ["export", "--model", str(tiny["model"]), "--silo-weights", str(garbage),
                                  "--trunk-weights", str(tiny["trunk"]), "--lora-r", "4", "--lora-alpha", "8",
                                  "--out", str(tmp_path / "y")])
    assert r.exit_code == 1 and "not a readable safetensors file" in r.output
