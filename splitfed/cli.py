"""The `splitfed` command: wires the roles' own commands into one group (no logic of its own).

Subcommands are imported only when run: `splitfed keys ...` or `--help` need not load torch.
"""

from __future__ import annotations

import importlib
import os

import click

# Roles block on sockets between bursts of compute; OpenMP threads that spin while waiting would
# steal the cores from the process computing next (measured: 7x slower serial steps on 2 cores).
# Must be set before torch loads libgomp, i.e. before any role is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMANDS = {
    "broker": ("broker.cli", "broker", "Route encrypted frames between silo agents and trunk workers."),
    "trunk": ("trunk_worker.cli", "trunk", "Serve the model's middle blocks to the silos of one run."),
    "silo": ("silo_agent.cli", "silo", "Train on this silo's private data through the split pipeline."),
    "demo": ("splitfed.demo.command", "demo", "A whole local federation in one command."),
    "keys": ("splitfed.keys_command", "keys", "Keys of silos and the trunk service; the run's allow-list."),
    "bench": ("splitfed.bench.command", "bench", "Benchmarks with JSON output."),
    "status": ("splitfed.status_command", "status", "Live table of a run (or the list of runs) from Redis."),
    "redis-acl": ("splitfed.redis_acl_command", "redis_acl_command", "Redis ACL users for the server roles, and their URLs."),
    "plot": ("splitfed.plot_command", "plot", "Plot loss per silo (and the centralized reference) from a demo JSON."),
    "audit": ("splitfed.audit.command", "audit", "Privacy audit: inversion attacks on the cut activations, and defenses."),
    "eval": ("splitfed.eval_command", "eval_command", "Task metrics of a base, split-trained or exported model on a JSONL."),
    "export": ("splitfed.export_command", "export", "Merge a silo's and the trunk's adapters into one PEFT adapter."),
    "experiment": ("splitfed.experiment.command", "experiment", "Experiments on real data (bbc: split-fed vs centralized)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="splitfed")
def main() -> None:
    """Split federated fine-tuning of LLMs over private silos."""
