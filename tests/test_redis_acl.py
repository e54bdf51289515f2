"""Redis ACL users per server role, on a real redis-server loading the generated ACL file.

The demo runs with its broker, trunk and operator each on its own ACL user (silos have none);
each user is refused what its role does not need; a role whose user lacks a permission exits with
a clear message; the ACL file shipped in ops/ is the generator's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from shared.state import redis_acl

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "splitfed-acl"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")


class AclRedis:
    """A private redis-server on a unix socket that loads ``acl`` (the default user is off)."""

    def __init__(self, tmp: Path, acl: str) -> None:
        self.socket = tmp / "redis.sock"
        (tmp / "users.acl").write_text(acl)
        self.proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(self.socket),
                                      "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                                      "--aclfile", str(tmp / "users.acl"), "--dir", str(tmp)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def url(self, role: str, password: str) -> str:
        return f"unix://{redis_acl.user_name(role)}:{password}@{self.socket}?db=0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def passwords():
    return redis_acl.random_passwords()


@pytest.fixture
def acl_redis(tmp_path, passwords):
    server = AclRedis(tmp_path, redis_acl.acl_text(PREFIX, passwords))
    yield server
    server.stop()


def test_the_demo_runs_with_one_acl_user_per_server_role(acl_redis, passwords, tmp_path):
    url = {role: acl_redis.url(role, passwords[role]) for role in redis_acl.ROLES}
    env = {**os.environ, "SPLITFED_REDIS_URL": url["operator"]}
    proc = subprocess.run([sys.executable, "-m", "splitfed", "demo", "--model", "tiny", "--silos", "2", "--steps", "4",
                           "--local-steps", "2", "--key-prefix", PREFIX, "--run-dir", str(tmp_path / "run"),
                           "--role-env", f"broker:SPLITFED_REDIS_URL={url['broker']}",
                           "--role-env", f"trunk:SPLITFED_REDIS_URL={url['trunk']}", "--check-centralized",
                           "--json", str(tmp_path / "demo.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lacks a permission" not in proc.stderr and "NOPERM" not in proc.stderr
    result = json.loads((tmp_path / "demo.json").read_text())
    assert len(result["losses"]) == 8 and result["max_abs_loss_diff"] <= 1e-5  # the same training as ever


def test_each_user_is_refused_what_its_role_does_not_need(acl_redis, passwords):
    for role in redis_acl.ROLES:
        client = redis.Redis.from_url(acl_redis.url(role, passwords[role]))
        client.set(f"{PREFIX}:run:r:probe", "1")  # within the prefix: allowed
        for attempt in (lambda: client.set("other:key", "1"),  # outside the prefix
                        lambda: client.flushall(), lambda: client.config_get("*"), lambda: client.keys("*"),
                        lambda: client.execute_command("MONITOR"), lambda: client.acl_list()):
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
        client.close()
    with pytest.raises(redis.exceptions.NoPermissionError):  # scanning is the operator's (`splitfed status`)
        redis.Redis.from_url(acl_redis.url("trunk", passwords["trunk"])).scan()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(acl_redis.url("broker", "wrong")).ping()
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError)):
        redis.Redis(unix_socket_path=str(acl_redis.socket)).ping()  # the default user is off


def test_a_role_whose_user_lacks_a_permission_exits_with_a_clear_message(tmp_path, passwords):
    lacking = redis_acl.acl_text(PREFIX, passwords).replace(" +hset", "")  # no HSET for anyone
    server = AclRedis(tmp_path, lacking)
    try:
        proc = subprocess.run([sys.executable, "-m", "splitfed", "broker", "--silos", "silo0", "--key-prefix", PREFIX,
                               "--frontend-bind", "tcp://127.0.0.1:*", "--backend-bind", "tcp://127.0.0.1:*"],
                              env={**os.environ, "SPLITFED_REDIS_URL": server.url("broker", passwords["broker"])},
                              capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "the Redis user of this broker lacks a permission it needs" in proc.stderr
    assert "hset" in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_the_shipped_acl_file_is_the_generators_and_the_command_writes_private_files(tmp_path):
    shipped = (ROOT / "ops" / "redis" / "users.acl").read_text()
    assert shipped == redis_acl.acl_text("splitfed", {r: redis_acl.PLACEHOLDER for r in redis_acl.ROLES})
    from splitfed.cli import main

    out = CliRunner().invoke(main, ["redis-acl", "--out", str(tmp_path / "acl"), "--host", "redis.example.org"])
    assert out.exit_code == 0, out.output
    for name in ("users.acl", "broker.redis.env", "trunk.redis.env", "operator.redis.env"):
        path = tmp_path / "acl" / name
        assert path.stat().st_mode & 0o077 == 0, name
        assert redis_acl.PLACEHOLDER not in path.read_text()
    broker_env = (tmp_path / "acl" / "broker.redis.env").read_text()
    assert broker_env.startswith("SPLITFED_REDIS_URL=redis://splitfed-broker:") and "@redis.example.org:6379/0" in broker_env
    assert broker_env.split(":")[2].split("@")[0] not in out.output  # no secret printed
    with pytest.raises(ValueError):
        redis_acl.acl_text("bad prefix*", {r: "x" for r in redis_acl.ROLES})


def _tls_files(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "splitfed test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_rediss_urls_work_and_an_unverified_server_is_refused(tmp_path, passwords):
    from shared.state.registry import Registry, RegistryError
    from splitfed.demo.runner import free_ports

    ca, cert, key = _tls_files(tmp_path)
    (tmp_path / "users.acl").write_text(redis_acl.acl_text(PREFIX, passwords))
    port = free_ports(1)[0]
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                             "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
                             "--aclfile", str(tmp_path / "users.acl"), "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = redis_acl.role_url("broker", passwords["broker"], "127.0.0.1", port, tls=True) + f"?ssl_ca_certs={ca}"
        registry = Registry(url, PREFIX, "r1")
        deadline = time.monotonic() + 20
        while True:
            try:
                registry.ping()
                break
            except RegistryError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server (TLS) did not start"
                time.sleep(0.1)
        registry.join("broker", "broker")
        assert registry.info("broker", "broker")["status"] == "joined"
        # without our CA the server's certificate does not verify: no connection at all
        with pytest.raises(redis.exceptions.ConnectionError, match="(?i)certificate"):
            redis.Redis.from_url(redis_acl.role_url("broker", passwords["broker"], "127.0.0.1", port, tls=True)).ping()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
