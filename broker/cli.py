"""`splitfed broker`: run the ZeroMQ broker of one run."""

from __future__ import annotations

import logging
import sys

import click

from broker.broker import Broker
from shared.runtime import exit_codes
from shared.runtime.cli_options import build_settings, open_registry, redis_permissions, settings_options
from shared.runtime.logs import configure_logging
from shared.state.run_config import ConfigMismatch, agree_with_run
from shared.runtime.settings import BrokerSettings
from shared.wire.transport import TransportError

log = logging.getLogger("broker")


@click.command("broker")
@settings_options(BrokerSettings)
def broker(**options: object) -> None:
    """Route encrypted frames between silo agents and trunk workers."""
    settings = build_settings(BrokerSettings, options)
    configure_logging(settings.log_level, "broker", settings.log_json)
    registry = open_registry(settings, log)
    with redis_permissions("broker", log):
        _serve(settings, registry)


def _serve(settings: BrokerSettings, registry) -> None:
    try:
        agree_with_run(registry, settings, "broker")  # mode and encryption
    except ConfigMismatch as exc:
        log.error("%s", exc)
        sys.exit(exit_codes.CONFIG)
    meta = registry.run_meta()
    silos = [s for s in (settings.silos or meta.get("silos", "")).split(",") if s]
    if not silos:
        log.error("run %s has no silos: pass --silos or create the run's metadata in Redis first", settings.run_id)
        sys.exit(exit_codes.CONFIG)
    local_steps = int(meta["local_steps"]) if meta.get("local_steps") else None
    try:
        code = Broker(settings, registry, silos, local_steps).run()
    except (NotImplementedError, TransportError) as exc:
        log.error("%s", exc)
        sys.exit(exit_codes.CONFIG)
    sys.exit(code)
