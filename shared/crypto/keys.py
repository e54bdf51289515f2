"""Key material: key sets in memory, fingerprints, and key files on disk (private keys mode 0600).

A silo holds two long-term keys: an Ed25519 *identity* (signs its per-round hello) and an X25519
key (mixed into every session key). The trunk service holds one X25519 key shared by its workers.

On disk (one directory per party; nothing secret is ever printed or logged)::

    silo:   ed25519.key  ed25519.pub  x25519.key  x25519.pub
    trunk:  x25519.key   x25519.pub

``*.key`` are unencrypted PKCS#8 PEM (readable by openssl), created 0600 from the first byte:
``os.open(..., 0o600)`` on a temporary name, then an atomic rename (shared.state.atomic_files). Loading refuses a private key
that group or others may read, like ssh does. ``*.pub`` hold the raw 32-byte key as one hex line,
so an operator can paste it into ``splitfed keys enroll``.

The run's allow-list of these keys in Redis is shared/crypto/enrollment.py's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import stat
import warnings
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from shared.state.atomic_files import write_bytes_atomic

KEY_BYTES = 32
ED25519_KEY, ED25519_PUB = "ed25519.key", "ed25519.pub"
X25519_KEY, X25519_PUB = "x25519.key", "x25519.pub"
MAX_KEY_FILE_BYTES = 4096  # a PEM private key is ~120 bytes: refuse to slurp anything big
MAX_SLOTS = 2**31 - 1  # nonce slots are u32 in the frame seq field, 0 is reserved


class KeyFileError(RuntimeError):
    """A key file is missing, unreadable, too permissive or malformed (message says which and how to fix)."""


class KeyStoreError(RuntimeError):
    """The Redis allow-list holds something unusable, or an enrollment request is invalid."""


class InsecureKeyFileWarning(UserWarning):
    pass


# ---------------------------------------------------------------- in-memory key sets


@dataclasses.dataclass(frozen=True)
class SiloKeys:
    # repr=False: a stray print() or log line must never show key objects (they don't print
    # secrets either, but nothing private belongs in a repr).
    identity: Ed25519PrivateKey = dataclasses.field(repr=False)
    x25519: X25519PrivateKey = dataclasses.field(repr=False)

    @property
    def identity_public(self) -> bytes:
        return raw_public(self.identity.public_key())

    @property
    def x25519_public(self) -> bytes:
        return raw_public(self.x25519.public_key())

    def __repr__(self) -> str:
        return f"SiloKeys(identity={fingerprint(self.identity_public)}, x25519={fingerprint(self.x25519_public)})"


@dataclasses.dataclass(frozen=True)
class TrunkKeys:
    x25519: X25519PrivateKey = dataclasses.field(repr=False)

    @property
    def x25519_public(self) -> bytes:
        return raw_public(self.x25519.public_key())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.x25519_public)

    def __repr__(self) -> str:
        return f"TrunkKeys(x25519={self.fingerprint})"


def new_silo_keys() -> SiloKeys:
    """Fresh keys in memory only (tests, benchmarks, the demo's throwaway silos)."""
    return SiloKeys(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())


def new_trunk_keys() -> TrunkKeys:
    return TrunkKeys(X25519PrivateKey.generate())


def raw_public(pub: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---------------------------------------------------------------- fingerprints

_FP_PREFIX = "sha256:"
_FP_RE = re.compile(r"^[0-9a-f]{64}$")


def fingerprint(public_key_bytes: bytes) -> str:
    """Canonical fingerprint: ``sha256:`` + 64 lowercase hex of SHA-256(raw public key).

    Canonical (no spaces) so it can sit in an env var unquoted; ``display_fingerprint`` groups it.
    """
    if len(public_key_bytes) != KEY_BYTES:
        raise ValueError(f"a public key is {KEY_BYTES} raw bytes, got {len(public_key_bytes)}")
    return _FP_PREFIX + hashlib.sha256(public_key_bytes).hexdigest()


def display_fingerprint(fp: str) -> str:
    """``sha256:1a2b3c4d 5e6f7081 ...``: groups of 8 hex digits, easier to compare by eye."""
    hexpart = normalize_fingerprint(fp)[len(_FP_PREFIX):]
    return _FP_PREFIX + " ".join(hexpart[i : i + 8] for i in range(0, 64, 8))


def normalize_fingerprint(fp: str) -> str:
    """Accept what a human may paste (grouped, colon-separated, upper case); return the canonical form."""
    text = fp.strip().lower()
    if text.startswith(_FP_PREFIX):
        text = text[len(_FP_PREFIX):]
    text = re.sub(r"[\s:]", "", text)
    if not _FP_RE.match(text):
        raise ValueError(f"not a sha256 fingerprint: {fp!r} (expected 'sha256:' + 64 hex digits)")
    return _FP_PREFIX + text


def fingerprints_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(normalize_fingerprint(a), normalize_fingerprint(b))


# ---------------------------------------------------------------- files


def generate_silo_keys(out_dir: str | os.PathLike, overwrite: bool = False) -> SiloKeys:
    """Create a silo's identity (Ed25519) and X25519 keys under ``out_dir``. Prints nothing."""
    keys = new_silo_keys()
    out = prepare_key_dir(Path(out_dir), [ED25519_KEY, ED25519_PUB, X25519_KEY, X25519_PUB], overwrite)
    write_private_key(out / ED25519_KEY, keys.identity)
    write_private_key(out / X25519_KEY, keys.x25519)
    write_public_key(out / ED25519_PUB, keys.identity_public)
    write_public_key(out / X25519_PUB, keys.x25519_public)
    return keys


def generate_trunk_keys(out_dir: str | os.PathLike, overwrite: bool = False) -> TrunkKeys:
    """Create the trunk service's X25519 key under ``out_dir`` (copy it to every trunk worker)."""
    keys = new_trunk_keys()
    out = prepare_key_dir(Path(out_dir), [X25519_KEY, X25519_PUB], overwrite)
    write_private_key(out / X25519_KEY, keys.x25519)
    write_public_key(out / X25519_PUB, keys.x25519_public)
    return keys


def load_silo_keys(key_dir: str | os.PathLike, allow_insecure: bool = False) -> SiloKeys:
    d = Path(key_dir)
    keys = SiloKeys(
        read_private_key(d / ED25519_KEY, Ed25519PrivateKey, allow_insecure),
        read_private_key(d / X25519_KEY, X25519PrivateKey, allow_insecure),
    )
    # A .pub that disagrees with its .key means someone mixed up directories: say so now, not at
    # enrollment time as an inexplicable "bad_hello_signature".
    _check_public_matches(d / ED25519_PUB, keys.identity_public)
    _check_public_matches(d / X25519_PUB, keys.x25519_public)
    return keys


def load_trunk_keys(key_dir: str | os.PathLike, allow_insecure: bool = False) -> TrunkKeys:
    d = Path(key_dir)
    keys = TrunkKeys(read_private_key(d / X25519_KEY, X25519PrivateKey, allow_insecure))
    _check_public_matches(d / X25519_PUB, keys.x25519_public)
    return keys


def load_public(path: str | os.PathLike) -> bytes:
    """Read a ``*.pub`` file (one line of 64 hex digits) as 32 raw bytes."""
    p = Path(path)
    text = _read_small(p).decode("ascii", errors="replace").strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != KEY_BYTES:
        raise KeyFileError(f"{p}: expected one line of {2 * KEY_BYTES} hex digits (a raw public key)")
    return raw


def load_silo_public(key_dir: str | os.PathLike) -> tuple[bytes, bytes]:
    """(ed25519, x25519) public keys of a silo directory: what an operator enrolls."""
    d = Path(key_dir)
    return load_public(d / ED25519_PUB), load_public(d / X25519_PUB)


def prepare_key_dir(out: Path, names: list[str], overwrite: bool) -> Path:
    # 0700 for a directory we create; an existing one is the operator's choice.
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not overwrite:
        existing = [n for n in names if (out / n).exists()]
        if existing:
            raise KeyFileError(f"{out}: {', '.join(existing)} already exist; refusing to overwrite keys")
    return out


def write_private_key(path: Path, key: Ed25519PrivateKey | X25519PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_bytes_atomic(path, pem, mode=0o600)  # 0600 from creation (O_EXCL temp file), then rename


def write_public_key(path: Path, raw: bytes) -> None:
    write_bytes_atomic(path, (raw.hex() + "\n").encode("ascii"), mode=0o644)


def _read_small(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file (generate keys with `splitfed keys gen`)") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: {st.st_size} bytes is too large for a key file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc}") from None


def read_private_key(path: Path, key_type: type, allow_insecure: bool):
    data = _read_small(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        msg = f"{path}: private key is accessible by group/others (mode {mode:04o}); run `chmod 600 {path}`"
        if not allow_insecure:
            raise KeyFileError(msg)
        warnings.warn(msg, InsecureKeyFileWarning, stacklevel=3)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # Never echo the file content: it is (or resembles) a secret.
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({type(exc).__name__})") from None
    if not isinstance(key, key_type):
        raise KeyFileError(f"{path}: holds a {type(key).__name__.replace('PrivateKey', '')} key, "
                           f"expected {key_type.__name__.replace('PrivateKey', '')}")
    return key


def _check_public_matches(path: Path, raw: bytes) -> None:
    if path.exists() and load_public(path) != raw:
        raise KeyFileError(f"{path}: does not match its private key (directories mixed up?)")


# ---------------------------------------------------------------- an enrollment, as the directory returns it


@dataclasses.dataclass(frozen=True)
class EnrolledSilo:
    silo_id: str
    ed25519_public: bytes
    x25519_public: bytes
    status: str  # "enrolled" | "revoked"
    enrolled_at: float
    revoked_at: float | None = None
    certificate: bytes | None = None  # operator-signed (shared/crypto/certificates.py); None if enrolled without

    @property
    def revoked(self) -> bool:
        return self.status != "enrolled"

    @property
    def fingerprint(self) -> str:
        """The silo's identity fingerprint (of its Ed25519 key)."""
        return fingerprint(self.ed25519_public)

    def as_dict(self) -> dict:
        return {
            "silo_id": self.silo_id,
            "status": self.status,
            "identity_fingerprint": self.fingerprint,
            "x25519_fingerprint": fingerprint(self.x25519_public),
            "ed25519": self.ed25519_public.hex(),
            "x25519": self.x25519_public.hex(),
            "enrolled_at": self.enrolled_at,
            "revoked_at": self.revoked_at,
            "certified": self.certificate is not None,
        }
