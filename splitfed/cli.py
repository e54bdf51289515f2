"""The `splitfed` command: wires the roles' own commands into one group (no logic of its own)."""

from __future__ import annotations

import os

# Roles block on sockets between bursts of compute; OpenMP threads that spin while waiting would
# steal the cores from the process computing next (measured: 7x slower serial steps on 2 cores).
# Must be set before torch loads libgomp, i.e. before the roles are imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from broker.cli import broker  # noqa: E402
from silo_agent.cli import silo
from splitfed.demo.command import demo
from splitfed.keys_command import keys
from trunk_worker.cli import trunk


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="splitfed")
def main() -> None:
    """Split federated fine-tuning of LLMs over private silos."""


main.add_command(broker)
main.add_command(trunk)
main.add_command(silo)
main.add_command(demo)
main.add_command(keys)
