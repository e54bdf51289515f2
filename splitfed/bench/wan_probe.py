"""What each emulated link really gives, measured from a silo's namespace (`splitfed bench wan`).

Before any federation runs, the bench checks its own emulation: an echo server in the server's
namespace, reached from a silo's namespace directly over the veth link and through the delaying
relay with each profile applied (tbf rate + relay delay). Per path: the round trip of a small
message (median of many) and the rate of a bulk transfer echoed back (bytes each way / seconds).
The direct path next to the relay at 0 ms is the relay's own cost in latency and bandwidth; each
profile's measured round trip and rate show the emulation does what the profile says.

The echo server and the client are this module (`python -m splitfed.bench.wan_probe serve|measure`),
started in their namespaces by ``probe_links``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PINGS = 40
BULK_BYTES = 16 << 20


def _echo(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(1 << 20):
            conn.sendall(data)


def serve(port: int, lifetime_s: float) -> None:
    """Echo every connection until the lifetime is over (the bench terminates it sooner)."""
    deadline = time.monotonic() + lifetime_s
    with socket.create_server(("0.0.0.0", port)) as lsock:
        lsock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                conn, _ = lsock.accept()
            except socket.timeout:
                continue
            conn.settimeout(None)
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def measure(host: str, port: int, pings: int = PINGS, bulk: int = BULK_BYTES) -> dict:
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            conn.sendall(b"p" * 64)
            got = 0
            while got < 64:
                got += len(conn.recv(64 - got))
            rtts.append(time.perf_counter() - t0)
        payload = bytes(1 << 20)
        t0 = time.perf_counter()

        def send() -> None:
            for _ in range(bulk >> 20):
                conn.sendall(payload)

        sender = threading.Thread(target=send)
        sender.start()
        got = 0
        while got < bulk:
            chunk = conn.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the echo closed early")
            got += len(chunk)
        seconds = time.perf_counter() - t0
        sender.join()
    return {"rtt_ms_median": round(1000 * statistics.median(rtts), 3), "rtt_ms_min": round(1000 * min(rtts), 3),
            "bulk_mbit_per_s_each_way": round(bulk * 8 / seconds / 1e6, 1), "bulk_bytes": bulk}


def probe_links(profiles, directory: Path, ports: tuple[int, int]) -> list[dict]:
    """Direct, then through the relay for each profile (``profiles[0]`` is loopback: the relay at 0 ms)."""
    from splitfed.demo.netns import NetnsHosts  # not needed by `serve`/`measure` inside the namespaces
    from splitfed.demo.processes import _die_with_parent

    directory.mkdir(parents=True, exist_ok=True)
    echo_port, relay_port = ports
    rows = []
    with NetnsHosts(["probe"]) as hosts:
        server = subprocess.Popen([*hosts.prefix("server"), sys.executable, "-m", "splitfed.bench.wan_probe", "serve",
                                   "--port", str(echo_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  preexec_fn=_die_with_parent)
        try:
            relay = hosts.start_relay("probe", relay_port, echo_port, directory)
            target = hosts.server_address_for("probe")
            paths = [("direct", None, f"{target}:{echo_port}")]
            paths += [(p.name if p.delay_ms or p.rate_mbit else "relay at 0 ms", p, relay.removeprefix("tcp://"))
                      for p in profiles]
            for name, profile, address in paths:
                if profile is not None:
                    hosts.set_delay("probe", profile.delay_ms)
                    hosts.shape("probe", profile.rate_mbit)
                    time.sleep(0.2)  # the relay reads its control file every 50 ms
                row = _measure_from(hosts.prefix("probe"), address)
                rows.append({"path": name, **({"profile": profile.as_dict()} if profile else {}), **row})
        finally:
            server.terminate()
            server.wait(timeout=10)
    return rows


def _measure_from(prefix: list[str], address: str) -> dict:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + 10
    while True:  # the echo server may still be starting
        proc = subprocess.run([*prefix, sys.executable, "-m", "splitfed.bench.wan_probe", "measure", "--host", host,
                               "--port", port], capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"probe to {address} failed: {proc.stderr[-1000:]}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--lifetime-s", type=float, default=600.0)
    m = sub.add_parser("measure")
    m.add_argument("--host", required=True)
    m.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.what == "serve":
        serve(args.port, args.lifetime_s)
    else:
        print(json.dumps(measure(args.host, args.port)))


if __name__ == "__main__":
    main()
