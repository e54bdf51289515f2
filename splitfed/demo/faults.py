"""Fault injection for the demo: `--kill ROLE@STEP` SIGKILLs a role when the run reaches STEP and
starts it again the way a supervisor (systemd's Restart=on-failure) would. `--kill ROLE@POINT`
(POINT a name from ``shared.runtime.failpoints.POINTS``) starts ROLE with that fail point armed: the role
stops itself at exactly that place in its code, and is killed and restarted there.

ROLE is broker, trunk (= trunk0) or trunkN, silo0..siloN, or redis (the demo then runs a private
Redis with an fsynced append-only file, so the restarted server has everything it acknowledged).
The run's progress is read from the silos' log lines ("round R step S loss L"): precise to a
step, and no extra Redis traffic. Each fault records when it struck and when the run had made up
the ground it lost (every silo past the newest step at the kill): the recovery time.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from shared.runtime import failpoints

_STEP_LINE = re.compile(rb"round \d+ step (\d+) loss")

# Fail points whose window is only reached when the restart comes late, as from a supervisor with
# a restart delay (systemd's RestartSec): a trunk killed at round-end-unsaved must first be declared
# dead by the broker (liveness_ttl_s, 5 s by default), which is what closes the round without it.
RESTART_DELAY_S = {"round-end-unsaved": 8.0}


@dataclass
class Fault:
    role: str  # a Federation role name, or "redis"
    at_step: int  # -1 for a fail point
    point: str | None = None  # a fail point name (shared.runtime.failpoints)
    killed_at: float | None = None
    killed_step: int | None = None
    recovered_at: float | None = None
    restart_at: float | None = None  # a delayed restart still to come
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {"role": self.role, "at_step": self.at_step, "killed_step": self.killed_step}
        if self.point is not None:
            out["point"] = self.point
        if self.killed_at is not None and self.recovered_at is not None:
            out["recovery_s"] = round(self.recovered_at - self.killed_at, 3)
        return out


def parse_kills(specs: tuple[str, ...], silo_ids: list[str], worker_ids: list[str]) -> list[Fault]:
    roles = {"broker", "redis", *silo_ids, *worker_ids, "trunk"}
    faults = []
    for spec in specs:
        role, _, step = spec.partition("@")
        if role not in roles or not (step.isdigit() or step in failpoints.POINTS):
            raise click.BadParameter(f"{spec!r}: expected ROLE@STEP or ROLE@POINT with ROLE one of "
                                     f"{', '.join(sorted(roles))} and POINT one of {', '.join(failpoints.POINTS)}",
                                     param_hint="--kill")
        role = "trunk0" if role == "trunk" else role
        if step.isdigit():
            faults.append(Fault(role, int(step)))
            continue
        point_role, where = failpoints.POINTS[step]
        if role.rstrip("0123456789") != point_role:  # trunk0 is a trunk
            raise click.BadParameter(f"{spec!r}: fail point {step} is in the {point_role} ({where})", param_hint="--kill")
        faults.append(Fault(role, -1, point=step))
    return sorted(faults, key=lambda f: f.at_step)


def armed_env(faults: list[Fault]) -> dict[str, dict[str, str]]:
    """Each role's extra environment arming its fail point (for its first start only)."""
    return {f.role: {failpoints.ENV: f.point} for f in faults if f.point is not None}


def stopped(pid: int) -> bool:
    """The process sits stopped (SIGSTOP: it reached its fail point)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"T"
    except (OSError, IndexError):
        return False


def latest_step(log_path: Path) -> int:
    """The newest step a silo's log reports (-1 before the first)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            found = _STEP_LINE.findall(f.read())
    except OSError:
        return -1
    return int(found[-1]) if found else -1


class FaultInjector:
    def __init__(self, faults: list[Fault], fed, private_redis, silo_ids: list[str]) -> None:
        self.faults, self.fed, self.redis, self.silo_ids = faults, fed, private_redis, silo_ids

    def poll(self) -> None:
        steps = [latest_step(self.fed.roles[s].log_path) for s in self.silo_ids]
        for fault in self.faults:
            if fault.restart_at is not None and time.monotonic() >= fault.restart_at:
                fault.restart_at = None
                self.fed.restart(fault.role)
            if fault.killed_at is None and fault.point is not None:
                if stopped(self.fed.roles[fault.role].proc.pid):
                    self._strike(fault, max(steps))
            elif fault.killed_at is None and max(steps) >= fault.at_step:
                self._strike(fault, max(steps))
            elif fault.killed_at is not None and fault.recovered_at is None and min(steps) > fault.killed_step:
                fault.recovered_at = time.monotonic()
                click.echo(f"fault {fault.role}@{fault.at_step}: recovered in "
                           f"{fault.recovered_at - fault.killed_at:.1f}s", err=True)

    def _strike(self, fault: Fault, step: int) -> None:
        where = f"fail point {fault.point}" if fault.point is not None else "step"
        click.echo(f"fault injection: SIGKILL {fault.role} at {where} (step {step}), then restart it", err=True)
        fault.killed_at, fault.killed_step = time.monotonic(), step
        if fault.role == "redis":
            self.redis.kill()
            time.sleep(0.5)
            self.redis.restart()
        else:
            self.fed.kill(fault.role)
            if fault.point is not None:  # started again disarmed, as a supervisor would start it
                role = self.fed.roles[fault.role]
                role.env = {k: v for k, v in (role.env or {}).items() if k != failpoints.ENV}
            delay = RESTART_DELAY_S.get(fault.point or "", 0.0)
            if delay:
                click.echo(f"  restarting {fault.role} in {delay:.0f}s, as a supervisor with a restart delay would", err=True)
                fault.restart_at = time.monotonic() + delay
            else:
                self.fed.restart(fault.role)

    def awaiting_restart(self) -> set[str]:
        """Roles killed on purpose whose (delayed) restart has not come yet: not failures."""
        return {f.role for f in self.faults if f.restart_at is not None}

    def restarted(self) -> set[str]:
        return {f.role for f in self.faults if f.killed_at is not None}
