"""The learned defense in the audit: `splitfed audit defend` end to end on a tiny model, strength 0
changes nothing, the retrained attacker's copy of a defended head, and clear errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from shared.data.tokenizer import byte_tokenizer
from shared.model.tiny_models import make_tiny_model_dir
from shared.model.privacy_adapter import PrivacyAdapter, PrivacyAdapterConfig
from splitfed.audit.attacks import Defense
from splitfed.audit.cut import HeadBlocks, TrainedHead
from splitfed.audit.defend_report import merge
from splitfed.audit.utility import FinetuneSpec, SplitPipeline, finetune, finetune_cost
from splitfed.cli import main

FAST = ["--victims", "4", "--max-tokens", "16", "--shadow", "16", "--learned-steps", "4", "--optim-steps", "3",
        "--finetune-steps", "2", "--finetune-batch", "2", "--eval-examples", "2", "--threads", "1"]
SPEC = FinetuneSpec(steps=2, batch_size=2, max_length=48, eval_examples=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), "llama")
    byte_tokenizer().save_pretrained(path)
    return path


def test_defend_writes_a_report_with_every_kind_of_row(tiny_dir, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["audit", "defend", "--model", str(tiny_dir), *FAST, "--cuts", "1,2",
                                       "--sigma", "0.5", "--strengths", "0.3", "--learned-sigma", "0.1",
                                       "--warmup-steps", "2", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "defend.json").read_text())
    assert [r["label"] for r in doc["rows"]] == ["1 block, none", "2 blocks, none", "1 block + clip + noise 0.5",
                                                 "1 block + learned 0.3 + clip + noise 0.1"]
    none1, none2, noise, learned = doc["rows"]
    assert none1["utility"] == none2["utility"]  # one fine-tune serves every undefended cut
    assert set(none1["attacks"]) == {"retrained", "optimization", "nearest"}
    assert set(learned["attacks"]) == {"retrained", "public", "optimization", "nearest"}
    for row in doc["rows"]:
        assert row["strongest"] == max(a["token_recovery"] for a in row["attacks"].values())
        assert 0.0 <= row["utility"]["eval_accuracy"] <= 100.0
    assert noise["clip_norm"] == doc["clip_norms"]["1"] and noise["sigma"] == 0.5
    assert learned["clip_norm"] == doc["clip_norms"]["1"] and learned["strength"] == 0.3
    assert len(learned["silo_inverter_loss"]) == 2 and len(learned["warmup_inverter_loss"]) == 2
    assert learned["defense_parameters"]["adapter"] == 64 + 2 * 64 * 32
    md = (out / "defend.md").read_text()
    assert md.startswith("| Cut / defense |") and "1 block + learned 0.3 + clip + noise 0.1 |" in md
    assert (out / "defend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_side_by_side_merge_into_one_report_and_mismatched_runs_are_refused(tiny_dir, tmp_path):
    docs = []
    for name, args in (("a", ["--cuts", "1", "--sigma", "", "--strengths", ""]),
                       ("b", ["--cuts", "", "--sigma", "", "--strengths", "0.5", "--rank", "8", "--no-public-attack"])):
        result = CliRunner().invoke(main, ["audit", "defend", "--model", str(tiny_dir), *FAST, *args,
                                           "--out-dir", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        docs.append(tmp_path / name / "defend.json")
    result = CliRunner().invoke(main, ["audit", "defend-merge", *map(str, docs), "--out-dir", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "m" / "defend.json").read_text())
    assert [r["label"] for r in doc["rows"]] == ["1 block, none", "1 block + learned 0.5"]
    assert doc["rows"][1]["run_config"]["rank"] == 8 and len(doc["runs"]) == 2
    assert set(doc["rows"][1]["attacks"]) == {"retrained", "optimization", "nearest"}  # --no-public-attack
    assert "adapter rank 8" in (tmp_path / "m" / "defend.md").read_text()
    other = json.loads(docs[1].read_text())
    other["config"]["victims"] = 99
    docs[1].write_text(json.dumps(other))
    result = CliRunner().invoke(main, ["audit", "defend-merge", *map(str, docs), "--out-dir", str(tmp_path / "x")])
    assert result.exit_code != 0 and "not comparable" in result.output and "Traceback" not in result.output


def test_merged_learned_rows_that_differ_in_a_setting_are_named_by_it():
    def run(distortion):
        row = dict(label="1 block + learned 3", kind="learned", cut=1, sigma=0.0, strength=3.0)
        config = dict(model="m", victims=1, max_tokens=4, shadow=1, finetune={}, seed=0, learned_steps=1,
                      optim_steps=1, rank=32, inverter_steps=2, inverter_lr=1e-3, adapter_lr=3e-3, warmup_steps=60,
                      distortion=distortion)
        return dict(model="m", config=config, clip_norms={"1": 1.0}, rows=[row], wall_s=1.0)

    doc = merge([run(100.0), run(1.0)])
    assert [r["label"] for r in doc["rows"]] == ["1 block + learned 3, distortion 100",
                                                 "1 block + learned 3, distortion 1"]
    assert [r["label"] for r in merge([run(1.0), run(1.0)])["rows"]] == ["1 block + learned 3"] * 2
    with pytest.raises(ValueError, match="nothing to merge"):
        merge([])


def test_strength_zero_changes_nothing_about_the_fine_tune(tiny_dir):
    off = finetune_cost(tiny_dir, 1, Defense(), SPEC)
    zero = finetune_cost(tiny_dir, 1, Defense(learned=PrivacyAdapterConfig(strength=0.0)), SPEC)
    assert off == zero
    assert not Defense(learned=PrivacyAdapterConfig(strength=0.0)).enabled
    _, pipe = finetune(tiny_dir, 1, Defense(learned=PrivacyAdapterConfig(strength=0.0)), SPEC)
    assert pipe.adapter is None and pipe.inverter is None


def test_the_learned_defense_trains_its_adapter_and_the_attacker_copy_uses_it(tiny_dir):
    defense = Defense(learned=PrivacyAdapterConfig(strength=1.0, rank=4, warmup_steps=2))
    scores, pipe = finetune(tiny_dir, 1, defense, SPEC)
    assert pipe.adapter is not None and not torch.equal(pipe.adapter.gain, torch.ones(64))  # it trained
    assert len(pipe.inverter_losses) == SPEC.steps and len(pipe.warmup_losses) == 2
    trained = TrainedHead(pipe.head, pipe.adapter)
    ids = torch.randint(4, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    bare = HeadBlocks(tiny_dir, 1).cut(ids, mask, 1)
    with torch.no_grad():
        assert torch.allclose(trained.cut(ids, mask, 1), pipe.adapter(TrainedHead(pipe.head, None).cut(ids, mask, 1)))
    assert not torch.allclose(trained.cut(ids, mask, 1), bare)  # the attacker's copy is the defended head
    with pytest.raises(ValueError, match="has 1 blocks, asked for a cut of 0"):
        trained.cut(ids, mask, 0)


def test_a_learned_defense_without_the_silo_vocabulary_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="needs the silo's vocabulary"):
        SplitPipeline(tiny_dir, 1, SPEC, Defense(learned=PrivacyAdapterConfig(strength=1.0)))
    assert PrivacyAdapter(64, 64)  # rank up to the hidden size is fine


@pytest.mark.parametrize("args, message", [
    (["--strengths", "-1"], "every value must be > 0"),
    (["--strengths", "x"], "expected comma-separated numbers"),
    (["--sigma", "0"], "every value must be > 0"),
    (["--cuts", "0"], "at least one head block"),
    (["--learned-cuts", "1,x"], "comma-separated integers"),
    (["--rank", "0"], "--rank"),
    (["--learned-sigma", "-1"], "--learned-sigma"),
    (["--cuts", "", "--sigma", "", "--strengths", ""], "nothing to run"),
    (["--cuts", "3"], "leaves no trunk and tail"),
])
def test_bad_input_is_a_clear_click_error(tiny_dir, args, message):
    result = CliRunner().invoke(main, ["audit", "defend", "--model", str(tiny_dir), *FAST, *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
