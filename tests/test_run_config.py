"""The run config every role must agree on (shared/state/run_config.py): digest, differences, where it is checked."""

from __future__ import annotations

import socket
import threading

import pytest
import zmq

from shared.crypto import keys as keystore
from shared.crypto.handshake import accept_hello, make_hello
from shared.wire.protocol import Kind
from shared.state.run_config import (
    LOCAL_FIELDS,
    RUN_CONFIG_FIELDS,
    ConfigMismatch,
    agree_with_run,
    check,
    claim_line,
    config_digest,
    describe,
    differences,
    meta_fields,
    parse_claim,
    run_config,
)
from shared.crypto.sealing import SealError
from shared.runtime.settings import BrokerSettings, CommonSettings, CryptoSettings, SiloSettings, TrunkSettings
from shared.wire.wire import Message, message_from_wire, message_to_wire
from tests.conftest import REDIS_URL
from tests.test_cli_errors import run_cli


def test_each_role_has_the_run_wide_fields_of_its_settings():
    silo, trunk, broker = run_config(SiloSettings()), run_config(TrunkSettings()), run_config(BrokerSettings())
    assert "mode" not in silo and trunk["mode"] == "serial"  # a silo does not know the mode
    assert set(trunk) == set(silo) | {"mode"}
    assert broker == {"encryption": True, "mode": "serial"}
    assert list(trunk) == [f for f in RUN_CONFIG_FIELDS if f in trunk]  # canonical order


def test_every_model_setting_is_either_run_wide_or_local():
    """A new model setting must be put in one list or the other: nobody forgets the check."""
    model_fields = set(CryptoSettings.model_fields) - set(CommonSettings.model_fields)
    assert model_fields == (set(RUN_CONFIG_FIELDS) - {"mode"}) | set(LOCAL_FIELDS)
    assert not set(RUN_CONFIG_FIELDS) & set(LOCAL_FIELDS)


def test_digest_is_canonical_and_changes_with_any_field():
    a = run_config(TrunkSettings())
    assert config_digest(a) == config_digest(dict(reversed(list(a.items()))))
    assert config_digest(a).startswith("sha256:") and len(config_digest(a)) == 7 + 64
    for field in a:
        changed = {**a, field: "other" if isinstance(a[field], str) else not a[field] if isinstance(a[field], bool)
                   else a[field] + 1}
        assert config_digest(changed) != config_digest(a), field


def test_differences_name_the_fields_both_sides_set():
    run = run_config(TrunkSettings(mode="client-batch"))
    silo = run_config(SiloSettings(head_layers=2, adapter="prefix"))
    assert differences(run, silo) == [("head_layers", 1, 2), ("adapter", "lora", "prefix")]  # no mode: the silo has none
    assert describe(differences(run, silo), "run", "this silo") == \
        'head_layers: run=1, this silo=2; adapter: run="lora", this silo="prefix"'
    assert differences(run, run_config(SiloSettings())) == []
    with pytest.raises(ConfigMismatch, match="config mismatch with the run: head_layers: run=1, this silo=2"):
        check(run, silo, "run", "this silo")


def test_a_claim_round_trips_and_a_bad_one_is_refused():
    cfg = run_config(SiloSettings(head_layers=3))
    assert parse_claim(f"incarnation=ab12\n{claim_line(cfg)}") == (config_digest(cfg), cfg)
    assert parse_claim("incarnation=ab12") is None and parse_claim(None) is None
    digest = config_digest(cfg)
    tampered = claim_line(cfg).replace('"head_layers":3', '"head_layers":1')
    for text, why in [(tampered, "digest"), (f"config={digest} {{not json", "not JSON"),
                      (f"config={digest} [1, 2]", "flat JSON object"), (f'config={digest} {{"a": {{"b": 1}}}}', "flat")]:
        with pytest.raises(ValueError, match=why):
            parse_claim(text)


def test_the_first_role_records_the_reference_and_a_different_one_is_refused(registry):
    assert registry.run_config() is None
    trunk = run_config(TrunkSettings(model="tiny"))
    assert registry.claim_run_config(run_config(BrokerSettings())) == {"encryption": True, "mode": "serial"}
    assert registry.claim_run_config(trunk) == trunk  # adds the fields the broker has not
    assert registry.run_meta()["config_digest"] == config_digest(trunk)
    assert agree_with_run(registry, SiloSettings(model="tiny"), "silo") == run_config(SiloSettings(model="tiny"))
    with pytest.raises(ConfigMismatch) as exc:
        agree_with_run(registry, SiloSettings(model="tiny", head_layers=2), "silo")
    assert "config mismatch with the run: head_layers: run=1, this silo=2" in str(exc.value)
    assert registry.run_config() == trunk  # a refused role changes nothing


def test_a_role_that_only_compares_records_nothing(registry):
    """Roles compare before loading their model and record only once they started: a role that
    fails to start (a bad model path, say) leaves no reference that would refuse the others."""
    assert agree_with_run(registry, SiloSettings(model="/no/such/model"), "silo", record=False)["model"] == "/no/such/model"
    assert registry.run_config() is None
    registry.claim_run_config(run_config(TrunkSettings(model="tiny")))
    with pytest.raises(ConfigMismatch, match='model: run="tiny", this silo="/no/such/model"'):
        agree_with_run(registry, SiloSettings(model="/no/such/model"), "silo", record=False)


def test_create_run_can_record_the_reference(registry):
    ref = run_config(TrunkSettings(model="tiny", mode="hierarchical"))
    registry.create_run({"mode": "hierarchical", **meta_fields(ref)})
    assert registry.run_config() == ref
    with pytest.raises(ConfigMismatch, match='mode: run="hierarchical", this broker="serial"'):
        agree_with_run(registry, BrokerSettings(), "broker")


def test_the_hello_signature_binds_the_silos_config_digest(tmp_path):
    trunk = keystore.generate_trunk_keys(tmp_path / "trunk")
    silo = keystore.generate_silo_keys(tmp_path / "silo")
    lookup = {"silo0": keystore.EnrolledSilo("silo0", silo.identity_public, silo.x25519_public, "enrolled", 0.0)}.get
    mine, other = config_digest({"head_layers": 1}), config_digest({"head_layers": 2})
    hello, _ = make_hello(silo, "silo0", "run1", 0, config_digest=mine)
    assert accept_hello(hello, trunk, lookup, "run1", config_digest=mine).silo_id == "silo0"
    for wrong in (other, None):  # another config, or the claim stripped on the way
        with pytest.raises(SealError) as exc:
            accept_hello(hello, trunk, lookup, "run1", config_digest=wrong)
        assert exc.value.reason == "bad_hello_signature"
    legacy, _ = make_hello(silo, "silo0", "run1", 1)
    accept_hello(legacy, trunk, lookup, "run1")  # a silo that binds no digest: as before
    with pytest.raises(SealError):
        accept_hello(legacy, trunk, lookup, "run1", config_digest=mine)


# ---------------------------------------------------------------- the broker refuses a READY that differs


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_broker_refuses_a_peer_whose_config_differs(registry):
    from broker.broker import Broker

    ref = run_config(TrunkSettings(model="tiny", encryption=False))
    registry.create_run({"mode": "serial", "silos": "silo0", **meta_fields(ref)})
    front, back = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"
    settings = BrokerSettings(redis_url=REDIS_URL, key_prefix=registry.prefix, run_id="run1", frontend_bind=front,
                              backend_bind=back, encryption=False)
    broker = Broker(settings, registry, ["silo0"], None)
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    ctx = zmq.Context.instance()
    silo, trunk = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for sock, address, identity in ((silo, front, b"silo0"), (trunk, back, b"trunk0")):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(address)

    def ask(sock, peer: str, config: dict | None = None, text: str | None = None) -> Message:
        text = text if config is None else f"incarnation=1234\n{claim_line(config)}"
        sock.send_multipart(message_to_wire(Message(Kind.READY, "run1", peer, text=text)))
        assert sock.poll(10000), "no reply"
        return message_from_wire(sock.recv_multipart())

    try:
        wrong_silo = run_config(SiloSettings(model="tiny", encryption=False, head_layers=2, lora_r=4))
        reply = ask(silo, "silo0", wrong_silo)
        assert reply.kind == Kind.ERROR
        assert reply.text == "config_mismatch: head_layers: run=1, this silo=2; lora_r: run=8, this silo=4"
        wrong_trunk = run_config(TrunkSettings(model="tiny", encryption=False, mode="hierarchical"))
        reply = ask(trunk, "trunk0", wrong_trunk)
        assert reply.kind == Kind.ERROR and reply.text == 'config_mismatch: mode: run="serial", this trunk worker="hierarchical"'
        assert "trunk0" not in broker.workers
        reply = ask(silo, "silo0", text="config=sha256:00 {}")
        assert reply.kind == Kind.ERROR and reply.text.startswith("bad_config")
        # agreeing peers (and one that claims nothing) are admitted
        assert ask(silo, "silo0", run_config(SiloSettings(model="tiny", encryption=False))).kind == Kind.READY
        assert ask(trunk, "trunk0", run_config(TrunkSettings(model="tiny", encryption=False))).kind == Kind.READY
        assert ask(silo, "silo0", text="incarnation=1234").kind == Kind.READY
        assert thread.is_alive()
    finally:
        broker.stop()
        thread.join(timeout=10)
        silo.close()
        trunk.close()


# ---------------------------------------------------------------- each role's CLI checks at start


def test_a_silo_has_no_redis_settings_and_leaves_the_check_to_the_broker():
    """A silo reaches only the broker (its READY claim is checked there, tests/test_config_agreement_processes.py)."""
    assert not {"redis_url", "key_prefix"} & set(SiloSettings.model_fields)
    assert {"redis_url", "key_prefix"} <= set(TrunkSettings.model_fields) & set(BrokerSettings.model_fields)
    proc = run_cli("silo", "--help")
    assert proc.returncode == 0 and "--broker-frontend" in proc.stdout and "--redis-url" not in proc.stdout


@pytest.mark.parametrize("role,args,expected", [
    ("trunk", ["--model", "tiny", "--head-layers", "2", "--tail-layers", "3"],
     "head_layers: run=1, this trunk=2; tail_layers: run=1, this trunk=3"),
    ("broker", ["--mode", "client-batch", "--silos", "silo0"], 'mode: run="serial", this broker="client-batch"'),
])
def test_a_role_started_with_other_settings_exits_with_the_config_code(registry, role, args, expected):
    registry.create_run({"silos": "silo0", **meta_fields(run_config(TrunkSettings(model="tiny")))})
    proc = run_cli(role, "--key-prefix", registry.prefix, "--run-id", "run1", *args,
                   env={"SPLITFED_CACHE_DIR": "/nonexistent"})  # refused before any model is looked at
    assert proc.returncode == 4, proc.stderr
    assert f"config mismatch with the run: {expected}" in proc.stderr and "Traceback" not in proc.stderr
