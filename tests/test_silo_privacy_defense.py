"""The learned privacy defense in the live silo agent (issue 19, item 4), on the tiny model.

* a real federation (`splitfed demo`: Redis, broker, trunk, silos as processes) with the defense on
  trains to the end, logs the silo inverter's loss per step, keeps each silo's adapter its own (only
  head/tail are averaged) and survives a silo killed and restarted from its round checkpoint;
* strength 0 is the run we had before: the same losses as a golden run of the code before the defense;
* bad settings are refused with a clear message;
* the adapter and the inverter are never in what secure aggregation uploads;
* one step's backward gives the head the trunk's dL/dh1 plus the adversarial term's gradient.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from shared.crypto import secure_agg
from shared.runtime.settings import SiloSettings
from silo_agent.privacy_defense import PREFIX, privacy_config

# `splitfed demo --model tiny --silos 2 --steps 4 --local-steps 2` (serial, encrypted, seed 0): the losses
# in trunk order, recorded with the code before the defense existed (commit 943a4d0); bit-equal then.
GOLDEN_LOSSES = [5.989344120025635, 5.890316009521484, 5.934913635253906, 6.075657367706299,
                 5.902043342590332, 5.818134307861328, 5.599432468414307, 5.588642597198486]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def model_dir(cache):
    from tests.harness import tiny_model_dir

    return tiny_model_dir(cache)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from splitfed.experiment.bbc import demo_examples

    path = tmp_path_factory.mktemp("data") / "silo0.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in demo_examples()[:16]))
    return path


def _agent(model_dir, data, tmp_path, **privacy):
    from silo_agent.agent import SiloAgent

    settings = SiloSettings(model="tiny", data=data, encryption=False, batch_size=2, max_length=48,
                            checkpoint_dir=tmp_path / "ckpt", **privacy)
    return SiloAgent(settings, model_dir)


def _demo(tmp_path, cache, redis_prefix, *args: str) -> tuple[dict, object]:
    run_dir, out = tmp_path / "run", tmp_path / "run.json"
    env = {**os.environ, "SPLITFED_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "splitfed", "demo", "--model", "tiny", "--silos", "2",
                           "--key-prefix", redis_prefix, "--run-dir", str(run_dir), "--json", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), run_dir


def _silo_results(run_dir, silo: str) -> dict:
    return json.loads((run_dir / "results" / f"{silo}.json").read_text())


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("field, value", [
    ("privacy_strength", -1.0), ("privacy_strength", float("nan")), ("privacy_rank", 0), ("privacy_lr", 0.0),
    ("privacy_distortion", -1.0), ("privacy_warmup_steps", -1), ("privacy_inverter_lr", 0.0),
    ("privacy_inverter_steps", 0)])
def test_bad_privacy_values_are_refused_by_name(field, value):
    with pytest.raises(ValidationError, match=field):
        SiloSettings(**{field: value})


@pytest.mark.parametrize("micro_batches", [2, "auto"])
def test_the_defense_refuses_micro_batches(micro_batches):
    with pytest.raises(ValueError, match="privacy_strength > 0 needs micro_batches 1"):
        privacy_config(SiloSettings(privacy_strength=1.0, micro_batches=micro_batches))
    assert privacy_config(SiloSettings(privacy_strength=0.0, micro_batches=micro_batches)) is None  # off: no check


def test_infinite_strength_is_refused():
    with pytest.raises(ValueError, match="finite"):
        privacy_config(SiloSettings(privacy_strength=math.inf))


def test_a_rank_above_the_hidden_size_is_refused_at_start(model_dir, data, tmp_path):
    with pytest.raises(ValueError, match=r"privacy_rank must be in 1\.\.64"):
        _agent(model_dir, data, tmp_path, privacy_strength=1.0, privacy_rank=65)


def test_the_silo_command_says_why_and_exits_config(cache, data, model_dir):
    proc = subprocess.run([sys.executable, "-m", "splitfed", "silo", "--model", "tiny", "--data", str(data),
                           "--encryption", "false", "--micro-batches", "2"],
                          env={**os.environ, "SPLITFED_CACHE_DIR": str(cache), "SPLITFED_PRIVACY_STRENGTH": "0.5"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr[-2000:]  # exit_codes.CONFIG
    assert "privacy_strength > 0 needs micro_batches 1" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ in one process
def test_the_adapter_and_inverter_are_never_uploaded(model_dir, data, tmp_path):
    agent = _agent(model_dir, data, tmp_path, privacy_strength=1.0, privacy_warmup_steps=0)
    private = {id(p) for p in agent.privacy.parameters()}
    uploaded = agent.aggregation.params
    assert private and uploaded and not private & {id(p) for p in uploaded}
    assert uploaded is agent.trainable  # exactly the head/tail trainables, as without the defense
    upload = secure_agg.plain_upload(uploaded, 1)
    assert upload.numel() == sum(p.numel() for p in agent.trainable) + 1  # head/tail values and the sample weight
    baseline = _agent(model_dir, data, tmp_path / "b")
    assert upload.shape == secure_agg.plain_upload(baseline.aggregation.params, 1).shape


def test_one_step_gives_the_head_the_trunks_gradient_plus_the_adversarial_one(model_dir, data, tmp_path):
    agent = _agent(model_dir, data, tmp_path, privacy_strength=2.0, privacy_warmup_steps=3)
    agent.privacy.warm_up()
    assert len(agent.privacy.warmup_losses) == 3
    batch = agent.dataset.batch(0)
    mask = batch.attention_mask
    from shared.model.model_split import positions_from_mask

    h1 = agent.head(batch.input_ids, mask, positions_from_mask(mask))
    d = agent.privacy.defend(h1, batch.input_ids, mask, 0, 0)
    agent.privacy.train_inverter()
    adversarial = agent.privacy._adversarial
    assert adversarial is not None and float(adversarial.detach()) < 0  # -lambda x the inverter's (capped) loss
    grad = torch.randn_like(d)  # stands for the trunk's dL/dh1
    head_params = [p for p in agent.head.parameters() if p.requires_grad]
    expected = torch.autograd.grad((d * grad).sum() + adversarial, head_params, retain_graph=True, allow_unused=True)
    adapter_before = [p.detach().clone() for p in agent.privacy.adapter.parameters()]
    agent.privacy.backward(d, grad)
    for p, want in zip(head_params, expected):
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, torch.zeros_like(p) if want is None else want)
    assert any(not torch.equal(a, b) for a, b in zip(adapter_before, agent.privacy.adapter.parameters()))
    assert agent.privacy.step_record()["inverter_loss"] > 0


def test_the_checkpoint_keeps_the_adapter_and_the_inverter(model_dir, data, tmp_path):
    agent = _agent(model_dir, data, tmp_path, privacy_strength=1.0, privacy_warmup_steps=2)
    agent.privacy.warm_up()  # some optimizer state too
    saved = {k: v.clone() for k, v in agent.privacy.state_tensors().items()}
    assert saved and all(k.startswith(PREFIX) for k in saved) and any("opt/" in k for k in saved)
    with torch.no_grad():
        for p in agent.privacy.parameters():
            p.add_(1.0)
    agent.privacy.load_state_tensors(saved)
    now = agent.privacy.state_tensors()
    assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


# ------------------------------------------------------------------ real federations
@pytest.mark.slow
def test_a_defended_federation_trains_to_the_end(tmp_path, cache, redis_prefix):
    """Two silos, three rounds, silo1 killed at step 3 and restarted from its round checkpoint."""
    from safetensors.torch import load_file

    result, run_dir = _demo(tmp_path, cache, redis_prefix, "--steps", "6", "--local-steps", "2",
                            "--privacy-strength", "1", "--cut-clip-norm", "5", "--cut-noise-sigma", "0.5",
                            "--kill", "silo1@3", "--role-env", "silo0:SPLITFED_PRIVACY_WARMUP_STEPS=20")
    assert result["losses"] and all(math.isfinite(v) for v in result["losses"])
    for silo in ("silo0", "silo1"):
        doc = _silo_results(run_dir, silo)
        assert doc["steps"][-1]["step"] == 5  # to the end
        assert all(s["inverter_loss"] > 0 and math.isfinite(s["inverter_loss"]) for s in doc["steps"])
    assert len(_silo_results(run_dir, "silo0")["privacy"]["warmup_inverter_loss"]) == 20
    assert "resumed from the checkpoint" in (run_dir / "logs" / "silo1.log").read_text()
    weights = run_dir / "weights"
    # head/tail averaged at the last round's end, so equal; each adapter trained on its own silo only
    federated = [load_file(str(weights / f"{s}.safetensors")) for s in ("silo0", "silo1")]
    assert all(torch.equal(federated[0][k], federated[1][k]) for k in federated[0])
    private = [load_file(str(weights / "privacy" / f"{s}.safetensors")) for s in ("silo0", "silo1")]
    assert private[0].keys() == private[1].keys() and any(k.startswith("inverter/") for k in private[0])
    assert not all(torch.equal(private[0][k], private[1][k]) for k in private[0])
    assert not set(private[0]) & set(federated[0])
    assert not torch.equal(private[0]["adapter/up"], torch.zeros_like(private[0]["adapter/up"]))  # it trained


@pytest.mark.slow
def test_strength_zero_is_the_run_before_the_defense(tmp_path, cache, redis_prefix):
    result, run_dir = _demo(tmp_path, cache, redis_prefix, "--steps", "4", "--local-steps", "2",
                            "--privacy-strength", "0", "--check-centralized")
    assert max(abs(a - b) for a, b in zip(result["losses"], GOLDEN_LOSSES, strict=True)) <= 1e-6
    assert result["max_abs_loss_diff"] <= 1e-5 and result["max_abs_weight_diff"] <= 1e-5
    assert not (run_dir / "weights" / "privacy").exists()
    doc = _silo_results(run_dir, "silo0")
    assert "privacy" not in doc and not any("inverter_loss" in s for s in doc["steps"])
