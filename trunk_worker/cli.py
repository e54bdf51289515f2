"""`splitfed trunk`: run one trunk worker."""

from __future__ import annotations

import logging
import sys

import click

from shared.runtime import exit_codes
from shared.runtime.cli_options import build_settings, open_registry, redis_permissions, settings_options
from shared.crypto.keys import KeyFileError, KeyStoreError
from shared.runtime.logs import configure_logging
from shared.model.models import resolve_model_dir
from shared.state.run_config import ConfigMismatch, agree_with_run
from shared.runtime.settings import TrunkSettings
from trunk_worker.worker import TrunkWorker

log = logging.getLogger("trunk")


@click.command("trunk")
@settings_options(TrunkSettings)
def trunk(**options: object) -> None:
    """Serve the model's middle blocks to the silos of one run."""
    settings = build_settings(TrunkSettings, options)
    configure_logging(settings.log_level, f"trunk[{settings.worker_id}]", settings.log_json)
    registry = open_registry(settings, log)
    with redis_permissions("trunk worker", log):
        _serve(settings, registry)


def _serve(settings: TrunkSettings, registry) -> None:
    try:
        agree_with_run(registry, settings, "trunk", record=False)  # before the model loads: fails in seconds
        model_dir = resolve_model_dir(settings.model)
        worker = TrunkWorker(settings, registry, model_dir)
        agree_with_run(registry, settings, "trunk")  # it starts: its fields become the run's where none are yet
    except (FileNotFoundError, ValueError, KeyFileError, KeyStoreError) as exc:
        log.error("%s", exc)
        sys.exit(exit_codes.CONFIG)
    try:
        sys.exit(worker.run())
    except ConfigMismatch as exc:  # the broker refused our READY
        log.error("%s", exc)
        sys.exit(exit_codes.CONFIG)
