"""The run config: the settings every role of a run must agree on, its digest, and what differs.

Model, split, adapter, seed, wire dtype, encryption and mode are set separately on the broker, the
trunk workers and each silo. A mismatch is silent otherwise: a silo with ``--head-layers 2`` next
to a trunk started with 1 repeats a block (the other way round, one is skipped) and trains on.

* ``run_config(settings)`` -- the fields of ``RUN_CONFIG_FIELDS`` that this role's settings class has
  (a silo has no mode; a broker has only mode and encryption). A new run-wide setting joins
  the check by being added to ``RUN_CONFIG_FIELDS`` (``LOCAL_FIELDS`` lists the model settings each
  part may choose on its own; a test makes every model setting be in one list or the other).
* ``config_digest(config)`` -- SHA-256 over the canonical JSON (sorted keys, no spaces).
* ``differences(reference, mine)`` -- the fields set on both sides whose values differ.

Where it is checked (each check compares fields, so the error names them):

1. at start, against the run's reference in Redis (``Registry.claim_run_config``: the run's
   ``meta`` hash, fields ``config`` and ``config_digest``; written by whoever creates the run, e.g.
   the demo, or else by the first role to start). A role that differs exits with exit code 4 (CONFIG).
2. READY (silo and trunk -> broker) carries a ``config=`` line (``claim_line``): the broker refuses a
   peer whose fields differ from the run's with ERROR ``config_mismatch: FIELD: run=A, this silo=B``.
3. HELLO (silo -> trunk) carries the same line, and the silo's digest is bound into the HELLO's
   signature (``shared.crypto.handshake.make_hello(config_digest=...)``): the trunk, which does not trust
   the broker, checks the fields against its own settings and verifies the signature over its own
   values, so a claim altered on the way fails the signature.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# The settings every role that has them must agree on. A future run-wide setting (a compute
# `dtype`, say) joins the digest and every check by being added here.
RUN_CONFIG_FIELDS = ("model", "head_layers", "tail_layers", "adapter", "lora_r", "lora_alpha", "prefix_len", "seed",
                     "wire_dtype", "dtype", "encryption", "cipher", "mode")
# Model settings that each part applies to its own weights only: they may differ between roles.
LOCAL_FIELDS = ("lora_init_b", "lr", "weight_decay", "keys_dir", "curve_broker_key", "checkpoint_dir")

CLAIM_PREFIX = "config="
MAX_CLAIM_FIELDS = 64


class ConfigMismatch(ValueError):
    """This role's settings do not agree with the run's (exit code 4, CONFIG)."""


def run_config(settings: Any) -> dict[str, Any]:
    """The run-wide fields of ``settings`` (a pydantic settings object), in canonical order."""
    fields = type(settings).model_fields
    return {name: _plain(getattr(settings, name)) for name in RUN_CONFIG_FIELDS if name in fields}


def canonical_json(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_digest(config: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(config).encode("ascii")).hexdigest()


def differences(reference: Mapping[str, Any], mine: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, reference value, my value) for each field both set and disagree on, in field order."""
    order = {name: i for i, name in enumerate(RUN_CONFIG_FIELDS)}
    common = sorted(set(reference) & set(mine), key=lambda k: (order.get(k, len(order)), k))
    return [(k, reference[k], mine[k]) for k in common if reference[k] != mine[k]]


def describe(diffs: list[tuple[str, Any, Any]], theirs: str = "run", mine: str = "this role") -> str:
    """``head_layers: run=1, this silo=2; adapter: run="lora", this silo="prefix"``."""
    return "; ".join(f"{k}: {theirs}={json.dumps(a)}, {mine}={json.dumps(b)}" for k, a, b in diffs)


def check(reference: Mapping[str, Any], mine: Mapping[str, Any], theirs: str = "run", me: str = "this role") -> None:
    """Raise ConfigMismatch naming every differing field."""
    if diffs := differences(reference, mine):
        raise ConfigMismatch(f"config mismatch with the {theirs}: {describe(diffs, theirs, me)}")


def meta_fields(config: Mapping[str, Any]) -> dict[str, str]:
    """The run metadata fields that record ``config`` as the run's reference (for ``create_run``)."""
    return {"config": canonical_json(config), "config_digest": config_digest(config)}


def agree_with_run(registry: Any, settings: Any, role: str, record: bool = True) -> dict[str, Any]:
    """At a role's start: record this role's fields the run's reference lacks, then compare
    (``record=False``: only compare, e.g. before the role has shown that its settings work, so a
    role that fails to start leaves no reference behind for the others).

    Returns this role's run config; raises ConfigMismatch naming the fields that differ."""
    mine = run_config(settings)
    reference = registry.claim_run_config(mine) if record else registry.run_config() or {}
    try:
        check(reference, mine, "run", f"this {role}")
    except ConfigMismatch as exc:
        raise ConfigMismatch(f"{exc} (the run's reference is `redis-cli HGET {registry.key('meta')} config`; "
                             "start every role with the same settings)") from None
    return mine


# ---------------------------------------------------------------- on the wire (READY and HELLO text)


def claim_line(config: Mapping[str, Any]) -> str:
    """``config=sha256:<hex> <canonical json>``: one line of a READY's or HELLO's text."""
    return f"{CLAIM_PREFIX}{config_digest(config)} {canonical_json(config)}"


def parse_claim(text: str | None) -> tuple[str, dict[str, Any]] | None:
    """The (digest, config) claimed in a message's text, None if it claims none.

    Raises ValueError when the claim is malformed or its digest is not that of its config."""
    line = next((ln for ln in (text or "").splitlines() if ln.startswith(CLAIM_PREFIX)), None)
    if line is None:
        return None
    digest, _, body = line[len(CLAIM_PREFIX):].partition(" ")
    try:
        config = json.loads(body)
    except ValueError:
        raise ValueError("the config claim is not JSON") from None
    if (not isinstance(config, dict) or len(config) > MAX_CLAIM_FIELDS
            or not all(isinstance(v, (str, int, float, bool)) or v is None for v in config.values())):
        raise ValueError("the config claim is not a flat JSON object")
    if config_digest(config) != digest:
        raise ValueError("the config claim's digest is not that of its fields")
    return digest, config


def read_reference(raw: str | None) -> dict[str, Any] | None:
    """The run's reference config from its metadata (None: not recorded yet)."""
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise ConfigMismatch(f"the run's metadata holds a config that is not a JSON object: {raw[:80]!r}")
    return config


def _plain(value: Any) -> Any:
    """JSON-safe scalars only (a Path or an enum becomes its string)."""
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
