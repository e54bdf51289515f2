"""`splitfed silo`: run one silo agent of a run."""

from __future__ import annotations

import logging
import sys

import click

from shared.runtime import exit_codes
from shared.runtime.cli_options import build_settings, settings_options
from shared.crypto.keys import KeyFileError
from shared.runtime.logs import configure_logging
from shared.model.models import resolve_model_dir
from shared.state.run_config import ConfigMismatch
from shared.crypto.sealing import SealError
from shared.runtime.settings import SiloSettings
from silo_agent.agent import PeerError, SiloAgent

log = logging.getLogger("silo")


@click.command("silo")
@settings_options(SiloSettings)
def silo(**options: object) -> None:
    """Train on this silo's private data through the split pipeline (one connection: the broker's)."""
    settings = build_settings(SiloSettings, options)
    configure_logging(settings.log_level, f"silo[{settings.silo_id}]", settings.log_json)
    try:
        agent = SiloAgent(settings, resolve_model_dir(settings.model))
    except (FileNotFoundError, ValueError, KeyFileError) as exc:
        log.error("%s", exc)
        sys.exit(exit_codes.CONFIG)
    try:
        sys.exit(agent.run())
    except ConfigMismatch as exc:  # the broker or the trunk refused our READY or HELLO
        log.error("%s", exc)
        sys.exit(exit_codes.CONFIG)
    except SealError as exc:  # e.g. the trunk's key is not the one pinned in our settings
        log.error("refusing to train: %s", exc)
        sys.exit(exit_codes.CONFIG if exc.reason in ("fingerprint_mismatch", "bad_ack") else exit_codes.PEER)
    except PeerError as exc:
        log.error("%s", exc)
        sys.exit(exit_codes.PEER)
