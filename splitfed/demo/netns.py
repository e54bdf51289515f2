"""Hosts on one machine: a network namespace for the server side and one per silo (`demo --hosts netns`).

    operator (this process) --veth-- server ns: Redis, broker, trunk workers
                                        |--veth-- silo0 ns
                                        |--veth-- silo1 ns ...

Each silo's namespace has one link, to the server's, and no route anywhere else; Redis listens on
the server's loopback and its operator link only, so a silo can reach the broker's frontend and
nothing of Redis (what a hospital firewall allows: one outbound port). Made with `ip netns` and
veth pairs (root, or CAP_NET_ADMIN), removed on exit whatever happens.

For `splitfed bench wan` a silo's link can also be shaped (``shape``: a tbf rate limit on both veth
ends) and given latency (``start_relay``: a delaying TCP relay in the server's namespace, between
the silo and the broker, splitfed/bench/wan_relay.py). The kernel here has no netem qdisc, hence
the relay; the relays stop with the hosts, and the qdiscs go with the veth ends they sit on.
"""

from __future__ import annotations

import fcntl
import json
import random
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from splitfed.demo.processes import _die_with_parent


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip`, no kernel support)."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


NET_LOCK = "/tmp/splitfed-netns.lock"


def _nets_in_use() -> set[int]:
    """The <net> of every 10.<net>.x.y address in this namespace (other federations' operator links)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    return {int(m) for m in re.findall(r"inet 10\.(\d+)\.", out)}


def _tc(*args: str) -> None:
    proc = subprocess.run(["tc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`tc {' '.join(args)}` failed: {proc.stderr.strip()}")


class NetnsHosts:
    def __init__(self, silo_ids: list[str]) -> None:
        self.tag = secrets.token_hex(3)
        self.net = 0  # 10.<net>.0.0/16, one per federation: picked in __enter__ among the unused ones
        self.server = f"sf{self.tag}-srv"
        self.silo_ns = {sid: f"sf{self.tag}-s{i}" for i, sid in enumerate(silo_ids)}
        self.silo_index = {sid: i for i, sid in enumerate(silo_ids)}
        self.redis: subprocess.Popen | None = None
        self._made: list[str] = []
        self.links: dict[str, tuple[str, str]] = {}  # silo id -> (its veth end on the server, its own end)
        self.relays: dict[str, subprocess.Popen] = {}
        self.relay_control: dict[str, Path] = {}

    # ------------------------------------------------------------------ addresses
    @property
    def operator_link(self) -> str:
        """The server's address on the operator's link (Redis listens here and on its loopback)."""
        return f"10.{self.net}.0.2"

    def server_address_for(self, silo_id: str) -> str:
        """The server's address on ``silo_id``'s link: where that silo reaches the broker."""
        return f"10.{self.net}.{self.silo_index[silo_id] + 1}.1"

    def prefix(self, role: str) -> list[str]:
        """The command prefix that runs a role on its host (the server's unless a silo)."""
        return ["ip", "netns", "exec", self.silo_ns.get(role, self.server)]

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> NetnsHosts:
        if shutil.which("ip") is None:
            raise NetnsUnavailable("no `ip` command (iproute2)")
        try:
            with open(NET_LOCK, "a") as lock:
                # Two federations with the same 10.<net> would both route the operator's link from
                # this namespace, and one would write its keys into the other's Redis: pick a net
                # no link here uses, under a lock, and hold it until our operator link exists.
                fcntl.flock(lock, fcntl.LOCK_EX)
                free = [n for n in range(200, 251) if n not in _nets_in_use()]
                if not free:
                    raise NetnsUnavailable("every 10.200-250.0.0/16 net is in use by other federations")
                self.net = random.choice(free)
                self._add_ns(self.server)
                self._link(None, "10.{}.0.1", self.server, self.operator_link, "o")
            for sid, ns in self.silo_ns.items():
                self._add_ns(ns)
                i = self.silo_index[sid] + 1
                self.links[sid] = self._link(self.server, self.server_address_for(sid), ns, f"10.{self.net}.{i}.2",
                                             f"s{i}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _link(self, a_ns: str | None, a_addr: str, b_ns: str, b_addr: str, name: str) -> tuple[str, str]:
        """A veth pair: end a in ``a_ns`` (None: this process's namespace), end b in ``b_ns``; one /24 each."""
        a_addr = a_addr.format(self.net)
        a, b = f"sf{self.tag}{name}a", f"sf{self.tag}{name}b"
        _ip("link", "add", a, "type", "veth", "peer", "name", b)
        _ip("link", "set", b, "netns", b_ns)
        if a_ns is not None:
            _ip("link", "set", a, "netns", a_ns)
        where = ["-n", a_ns] if a_ns is not None else []
        _ip(*where, "addr", "add", f"{a_addr}/24", "dev", a)
        _ip(*where, "link", "set", a, "up")
        _ip("-n", b_ns, "addr", "add", f"{b_addr}/24", "dev", b)
        _ip("-n", b_ns, "link", "set", b, "up")
        return a, b

    # ------------------------------------------------------------------ shaping (bench wan)
    def shape(self, silo_id: str, rate_mbit: float | None) -> None:
        """Limit ``silo_id``'s link to ``rate_mbit`` each way (tbf on both veth ends), or lift it (None).

        tbf's bucket must hold at least one GSO packet (64 KiB on veth) and a few timer ticks of
        traffic, or the link runs below its rate: 4 ms of traffic, at least 128 KiB."""
        server_end, silo_end = self.links[silo_id]
        for ns, dev in ((self.server, server_end), (self.silo_ns[silo_id], silo_end)):
            if rate_mbit is None:
                subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
                continue
            burst = max(128 * 1024, int(rate_mbit * 1e6 / 8 * 0.004))
            _tc("-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                "burst", str(burst), "latency", "50ms")

    def start_relay(self, silo_id: str, port: int, broker_port: int, directory: Path, delay_ms: float = 0.0) -> str:
        """A delaying relay on the server's address of ``silo_id``'s link, ``port``, forwarding to the
        broker's frontend on the server's loopback. Returns the address the silo connects to."""
        control = directory / f"relay-{silo_id}.json"
        ready = directory / f"relay-{silo_id}.ready"
        ready.unlink(missing_ok=True)
        self.relay_control[silo_id] = control
        self.set_delay(silo_id, delay_ms)
        with open(directory / f"relay-{silo_id}.log", "ab") as log:  # a relay dies with us (PDEATHSIG) too
            self.relays[silo_id] = subprocess.Popen(
                [*self.prefix("server"), sys.executable, "-m", "splitfed.bench.wan_relay",
                 "--listen", f"{self.server_address_for(silo_id)}:{port}", "--upstream", f"127.0.0.1:{broker_port}",
                 "--control", str(control), "--ready-file", str(ready)],
                stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.relays[silo_id].poll() is not None or time.monotonic() > deadline:
                raise NetnsUnavailable(f"the relay for {silo_id} did not start (see {directory}/relay-{silo_id}.log)")
            time.sleep(0.05)
        return f"tcp://{self.server_address_for(silo_id)}:{port}"

    def set_delay(self, silo_id: str, delay_ms: float) -> None:
        """The relay's one-way delay (each direction), by renaming a new control file in place."""
        control = self.relay_control[silo_id]
        tmp = control.with_suffix(".tmp")
        tmp.write_text(json.dumps({"delay_ms": delay_ms}))
        tmp.replace(control)

    def start_redis(self, binary: str, directory: Path, port: int = 6379) -> str:
        """A private Redis on the server host; returns its URL (for the operator and the servers)."""
        self.redis = subprocess.Popen(
            [*self.prefix("server"), binary, "--bind", "127.0.0.1", self.operator_link, "--port", str(port),
             "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        url = f"redis://{self.operator_link}:{port}/0"
        import redis  # the demo's own client (this module is imported before Redis is needed)

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
                return url
            except redis.RedisError:
                if self.redis.poll() is not None or time.monotonic() > deadline:
                    raise NetnsUnavailable("the server namespace's redis-server did not start") from None
                time.sleep(0.1)

    def __exit__(self, *_: object) -> None:
        for relay in self.relays.values():
            if relay.poll() is None:
                relay.terminate()
        for relay in self.relays.values():
            try:
                relay.wait(timeout=5)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait()
        self.relays.clear()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            try:
                self.redis.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis.kill()
        for ns in reversed(self._made):  # a namespace's veth ends (and their peers) go with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
