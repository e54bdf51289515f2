"""`splitfed audit invert` end to end on a tiny model directory, and its errors on bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from shared.model.tiny_models import make_tiny_model_dir
from shared.data.tokenizer import byte_tokenizer
from splitfed.cli import main

FAST = ["--victims", "4", "--max-tokens", "16", "--shadow", "16", "--learned-steps", "4", "--optim-steps", "3",
        "--finetune-steps", "2", "--finetune-batch", "2", "--eval-examples", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), "llama")
    byte_tokenizer().save_pretrained(path)
    return path


def test_invert_writes_json_markdown_and_png(tiny_dir, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["audit", "invert", "--model", str(tiny_dir), *FAST, "--cuts", "0,1",
                                       "--sigma", "0.5,2", "--out-dir", str(out), "--json", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "invert.json").read_text())
    assert doc == json.loads((tmp_path / "a.json").read_text())
    labels = [r["label"] for r in doc["rows"]]
    assert labels == ["embeddings only", "1 head block", "1 block + clip", "1 block + clip + noise 0.5",
                      "1 block + clip + noise 2"]
    for row in doc["rows"]:
        for scores in row["attacks"].values():
            assert all(0.0 <= v <= 100.0 for v in scores.values())
    assert doc["rows"][0]["attacks"]["nearest"]["token_recovery"] > 90.0  # embeddings only
    assert doc["rows"][0]["utility"] is None  # no silo has 0 head blocks
    for row in doc["rows"][1:]:
        assert 0.0 <= row["utility"]["eval_accuracy"] <= 100.0 and row["utility"]["eval_loss"] > 0
    assert [r["defense"]["sigma"] for r in doc["rows"][2:]] == [0.0, 0.5, 2.0]
    md = (out / "invert.md").read_text()
    assert md.startswith("| Cut / defense |") and "1 block + clip + noise 2 |" in md
    assert (out / "invert.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "token rec. %" in result.stdout  # the table on stdout
    assert "[1/5] embeddings only" in result.stderr  # progress on stderr


def test_invert_json_to_stdout(tiny_dir):
    result = CliRunner().invoke(main, ["audit", "invert", "--model", str(tiny_dir), *FAST, "--cuts", "0",
                                       "--defense-cut", "1", "--sigma", "1", "--json", "-"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["audit"] == "invert" and len(doc["rows"]) == 3


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "not one of 'smollm2', 'gemma3', 'qwen2.5-coder-0.5b' nor a directory"),
    (["--sigma", "-1"], "every sigma must be > 0"),
    (["--sigma", "abc"], "expected 'auto' or comma-separated numbers"),
    (["--clip-norm", "-2"], "--clip-norm"),
    (["--cuts", "1,x"], "comma-separated integers"),
    (["--cuts", "-1"], "block counts >= 0"),
    (["--victims", "0"], "--victims"),
    (["--cuts", "3"], "leaves no trunk and tail"),
])
def test_bad_input_is_a_clear_click_error(tiny_dir, args, message):
    base = ["audit", "invert", "--model", str(tiny_dir), *FAST]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
