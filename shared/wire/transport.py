"""ZeroMQ sockets of the roles, with optional CurveZMQ underneath the end-to-end sealing.

CurveZMQ authenticates and encrypts each hop (silo <-> broker, worker <-> broker). The broker's
two ROUTER sockets are CURVE servers; a ZAP handler (pyzmq's ThreadAuthenticator) admits only
clients whose public certificate is in the allow-list directory. This sits *under* the sealing
of shared/crypto/sealing.py: the broker still never sees plaintext tensors; Curve additionally keeps
unknown peers from reaching the broker at all.

Certificates are pyzmq's ZPL files: ``NAME.key`` (public) and ``NAME.key_secret`` (secret),
made by `splitfed keys curve`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)


class TransportError(ValueError):
    pass


def _load_secret_cert(path: Path | None, role: str) -> tuple[bytes, bytes]:
    if path is None:
        raise TransportError(f"--curve needs this {role}'s secret certificate: --curve-cert FILE.key_secret")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise TransportError(f"{path}: cannot load a CurveZMQ certificate: {exc}") from None
    if secret is None:
        raise TransportError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def broker_key(value: str | None) -> bytes:
    """The broker's public key: a Z85 string (40 chars) or the path of its public certificate."""
    if not value:
        raise TransportError("--curve needs the broker's public key: --curve-broker-key Z85 or FILE.key")
    if len(value) == 40 and not Path(value).exists():
        return value.encode("ascii")
    try:
        public, _ = zmq.auth.load_certificate(value)
    except (OSError, ValueError) as exc:
        raise TransportError(f"{value}: not a Z85 key nor a readable certificate: {exc}") from None
    return public


def client_socket(ctx: zmq.Context, identity: str, address: str, curve: bool,
                  curve_cert: Path | None = None, curve_broker_key: str | None = None) -> zmq.Socket:
    """A DEALER connected to the broker, identified by ``identity``, Curve-secured when asked."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    # While the broker is down, libzmq retries the connection with a doubling interval (0.1 s up
    # to 5 s) instead of hammering it every 100 ms; a restarted broker is found within 5 s.
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    if curve:
        public, secret = _load_secret_cert(curve_cert, identity)
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = broker_key(curve_broker_key)
    sock.connect(address)
    return sock


class ServerSecurity:
    """The broker's side: CURVE server sockets and the ZAP allow-list."""

    def __init__(self, ctx: zmq.Context, curve: bool, curve_cert: Path | None, allow_dir: Path | None) -> None:
        self.curve = curve
        self.auth: ThreadAuthenticator | None = None
        if not curve:
            return
        self.public, self.secret = _load_secret_cert(curve_cert, "broker")
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("broker.zap"))
        self.auth.start()
        if allow_dir is None:
            log.warning("CurveZMQ without an allow-list: hops are encrypted but any client key is admitted")
            self.auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            if not Path(allow_dir).is_dir():
                raise TransportError(f"{allow_dir}: the CurveZMQ allow-list must be a directory of public certificates")
            self.auth.configure_curve(domain="*", location=str(allow_dir))
            log.info("CurveZMQ allow-list: %d certificates in %s", len(list(Path(allow_dir).glob("*.key"))), allow_dir)

    def secure(self, sock: zmq.Socket) -> None:
        if self.curve:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = self.public, self.secret

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()
