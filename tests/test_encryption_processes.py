"""End-to-end encryption with real processes, sockets and Redis.

* only enrolled, unrevoked silos can open a session and train;
* a silo refuses a trunk whose key is not the one pinned in its settings;
* the bytes the broker forwards never contain the plaintext activations (and, as a control, they do
  when encryption is off: the check can fail).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from broker.broker import Broker
from shared.crypto import keys as keystore
from shared.crypto import enrollment
from shared.data.dataset import SiloDataset, load_jsonl
from shared.model.part_loading import build_silo_parts
from shared.model.model_split import positions_from_mask
from shared.model.models import resolve_model_dir
from shared.state.registry import Registry
from shared.runtime.settings import BrokerSettings, SiloSettings
from shared.data.tokenizer import load_tokenizer
from tests.conftest import REDIS_URL
from tests.test_processes import _free_port

pytestmark = pytest.mark.slow

RUN = "enc"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    os.environ.setdefault("SPLITFED_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return resolve_model_dir("tiny")


class TappedBroker(Broker):
    """The real broker, recording a copy of every frame it sends on to trunk workers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.to_trunk: list[bytes] = []

    def _forward_to_worker(self, worker, frames) -> None:
        self.to_trunk.extend(bytes(f.buffer if hasattr(f, "buffer") else f) for f in frames)
        super()._forward_to_worker(worker, frames)


class Federation:
    """Broker in a thread (tapped), trunk worker as a process, silos as processes."""

    def __init__(self, prefix: str, tmp: Path, encryption: bool) -> None:
        self.tmp, self.prefix, self.encryption = tmp, prefix, encryption
        self.registry = Registry(REDIS_URL, prefix, RUN)
        self.registry.create_run({"mode": "serial", "silos": "silo0", "local_steps": 2})
        self.front, back = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
        settings = BrokerSettings(redis_url=REDIS_URL, key_prefix=prefix, run_id=RUN,
                                  frontend_bind=self.front, backend_bind=back, encryption=encryption)
        self.broker = TappedBroker(settings, self.registry, ["silo0"], 2)
        self.thread = threading.Thread(target=self.broker.run, daemon=True)
        self.thread.start()
        self.trunk_keys = keystore.generate_trunk_keys(tmp / "trunk-keys")
        self.env = {**os.environ, "SPLITFED_REDIS_URL": REDIS_URL, "SPLITFED_KEY_PREFIX": prefix,
                    "SPLITFED_RUN_ID": RUN, "SPLITFED_MODEL": "tiny", "SPLITFED_ENCRYPTION": str(encryption).lower()}
        self.trunk = subprocess.Popen(
            [sys.executable, "-m", "splitfed", "trunk", "--broker-backend", back, "--keys-dir", str(tmp / "trunk-keys")],
            env=self.env, stdout=open(tmp / "trunk.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self.registry.alive("trunk", "trunk0"):
            assert time.monotonic() < deadline and self.trunk.poll() is None, (tmp / "trunk.log").read_text()
            time.sleep(0.2)
        self.data = tmp / "silo0.jsonl"
        self.data.write_text("".join(json.dumps({"prompt": f"Patient {i} notes:", "completion": f" code {i % 4}"}) + "\n"
                                     for i in range(8)))

    def silo(self, keys_dir: Path | None, fingerprint: str | None, steps: int = 2, name: str = "silo") -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "splitfed", "silo", "--broker-frontend", self.front, "--silo-id", "silo0",
                "--data", str(self.data), "--steps", str(steps), "--local-steps", "2", "--batch-size", "2",
                "--max-length", "32", "--step-timeout-s", "60"]
        if keys_dir is not None:
            args += ["--keys-dir", str(keys_dir)]
        if fingerprint is not None:
            args += ["--trunk-fingerprint", fingerprint]
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=300)

    def close(self) -> None:
        self.broker.stop()
        self.thread.join(timeout=10)
        self.trunk.terminate()
        self.trunk.wait(timeout=10)


@pytest.fixture
def enc_federation(redis_prefix, tiny_dir, tmp_path):
    fed = Federation(redis_prefix, tmp_path, encryption=True)
    yield fed
    fed.close()


def test_enrollment_revocation_and_pinning(enc_federation, tmp_path):
    fed = enc_federation
    silo_keys = keystore.generate_silo_keys(tmp_path / "silo-keys")

    # not enrolled: the broker refuses its registration, the silo stops with the reason
    proc = fed.silo(tmp_path / "silo-keys", fed.trunk_keys.fingerprint)
    assert proc.returncode == 5 and "unknown_silo" in proc.stderr, proc.stderr

    # a trunk key other than the pinned one: the silo refuses to send anything
    other = keystore.fingerprint(keystore.new_trunk_keys().x25519_public)
    enrollment.enroll(fed.registry, "silo0", silo_keys.identity_public, silo_keys.x25519_public)
    proc = fed.silo(tmp_path / "silo-keys", other)
    assert proc.returncode == 4 and "not the pinned" in proc.stderr, proc.stderr

    # enrolled and pinned right: trains
    proc = fed.silo(tmp_path / "silo-keys", fed.trunk_keys.fingerprint)
    assert proc.returncode == 0, proc.stderr

    # revoked: refused again
    enrollment.revoke(fed.registry, "silo0")
    proc = fed.silo(tmp_path / "silo-keys", fed.trunk_keys.fingerprint)
    assert proc.returncode == 5 and "revoked" in proc.stderr, proc.stderr

    # another silo's keys cannot register as silo0 (signature does not match the enrollment)
    enrollment.enroll(fed.registry, "silo0", silo_keys.identity_public, silo_keys.x25519_public, replace=True)
    keystore.generate_silo_keys(tmp_path / "mallory-keys")
    proc = fed.silo(tmp_path / "mallory-keys", fed.trunk_keys.fingerprint)
    assert proc.returncode == 5 and "not signed by its enrolled identity" in proc.stderr, proc.stderr

    rejected = fed.registry.rejected()
    for reason in ("unknown_silo", "revoked", "bad_registration"):
        assert rejected.get(reason, 0) >= 1, rejected
    assert fed.trunk.poll() is None, "the trunk worker must keep serving"


def _first_activation(tiny_dir: Path, data: Path) -> bytes:
    """What silo0 sends at step 0: recomputed here from the same model, adapter seed and data."""
    settings = SiloSettings(model="tiny", data=data, batch_size=2, max_length=32)
    head, _ = build_silo_parts(tiny_dir, 1, 1)
    from shared.model.adapters import apply_adapter

    apply_adapter(head, settings.adapter_config(), settings.seed)
    batch = SiloDataset(load_jsonl(data), load_tokenizer(tiny_dir), 2, 32, settings.seed, 0).batch(0)
    with torch.no_grad():
        h1 = head(batch.input_ids, batch.attention_mask, positions_from_mask(batch.attention_mask))
    return h1.contiguous().numpy().tobytes()


@pytest.mark.parametrize("encryption", [True, False])
def test_broker_never_sees_plaintext_activations(encryption, redis_prefix, tiny_dir, tmp_path):
    fed = Federation(redis_prefix, tmp_path, encryption=encryption)
    try:
        if encryption:
            silo_keys = keystore.generate_silo_keys(tmp_path / "silo-keys")
            enrollment.enroll(fed.registry, "silo0", silo_keys.identity_public, silo_keys.x25519_public)
            proc = fed.silo(tmp_path / "silo-keys", fed.trunk_keys.fingerprint, steps=1)
        else:
            proc = fed.silo(None, None, steps=1)
        assert proc.returncode == 0, proc.stderr
    finally:
        fed.close()
    h1 = _first_activation(tiny_dir, fed.data)
    forwarded = b"".join(fed.broker.to_trunk)
    assert len(forwarded) > len(h1)
    # any 32-byte window of the activation (8 floats) would be a leak
    windows = [h1[i : i + 32] for i in range(0, len(h1) - 32, 256)]
    leaked = any(w in forwarded for w in windows)
    assert leaked is not encryption
