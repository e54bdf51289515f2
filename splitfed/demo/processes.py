"""Start the federation's roles as real OS processes and make sure none outlives the demo.

Each child runs ``python -m splitfed ROLE`` in its own session (so a terminal Ctrl+C reaches only
the demo, which then stops the children in order) and with PR_SET_PDEATHSIG, so even a demo
killed with SIGKILL takes its children with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the demo's own cleanup still stops children


@dataclass
class Role:
    name: str
    proc: subprocess.Popen
    log_path: Path
    args: list[str]
    env: dict[str, str] | None
    restarts: int = 0
    prefix: tuple[str, ...] = ()  # e.g. `ip netns exec NS`: the host it runs on


class Federation:
    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.roles: dict[str, Role] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> Role:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "splitfed", *args],
                env={**os.environ, **self.env, **(env or {})},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        role = Role(name, proc, log_path, list(args), env, self.roles[name].restarts if name in self.roles else 0,
                    tuple(prefix))
        self.roles[name] = role
        return role

    def kill(self, name: str) -> None:
        """SIGKILL a role (fault injection) and wait until it is gone."""
        role = self.roles[name]
        role.proc.kill()
        role.proc.wait()

    def restart(self, name: str) -> Role:
        """Start a role again with its original command line, as a supervisor would."""
        old = self.roles[name]
        role = self.start(name, old.args, old.env, old.prefix)
        role.restarts = old.restarts + 1
        return role

    def exited(self) -> dict[str, int]:
        return {n: r.proc.returncode for n, r in self.roles.items() if r.proc.poll() is not None}

    def failed(self) -> dict[str, int]:
        return {n: c for n, c in self.exited().items() if c != 0}

    def stop(self, names: list[str] | None = None, timeout: float = 10.0) -> None:
        """SIGTERM (a warm stop), then SIGKILL whatever is still running after ``timeout``."""
        targets = [self.roles[n] for n in (names or list(self.roles)) if n in self.roles]
        for r in targets:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for r in targets:
            try:
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()

    def tail(self, name: str, lines: int = 25) -> str:
        try:
            return "\n".join(self.roles[name].log_path.read_text(errors="replace").splitlines()[-lines:])
        except (KeyError, OSError):
            return ""
