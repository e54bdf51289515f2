"""A delaying TCP relay: what `tc netem delay` would do, in user space (`splitfed bench wan`).

This machine's kernel has no netem qdisc ("Specified qdisc kind is unknown"), while tbf works: the
bench limits the rate with tbf on the veth links and adds the latency here. The relay listens on
one address and forwards every accepted connection to one upstream address, holding each chunk of
bytes in each direction for the one-way delay before sending it on:

    silo --veth (tbf)--> relay: recv chunk, stamp arrival --queue--> send at arrival + delay --> broker

Order is kept (one FIFO per direction, one reader and one writer thread each); the queue is bounded
in bytes, so a stalled receiver stops the reader and TCP pushes back on the sender, as a router's
buffer would (the bound is above every bench profile's bandwidth-delay product, so it never caps
the rate by itself). The delay is read from a control file (`{"delay_ms": x}`) that the bench
rewrites between phases; a chunk already queued keeps the arrival stamp it got, and the FIFO only
ever sends a chunk after the one before it.

Run as `python -m splitfed.bench.wan_relay --listen HOST:PORT --upstream HOST:PORT --control FILE`.
It stops by itself after --lifetime-s, or on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import threading
import time
from collections import deque
from pathlib import Path

CHUNK = 256 * 1024  # one recv: large enough that 10 Gbit/s is a few thousand wake-ups a second
QUEUE_BYTES = 16 * 1024 * 1024  # per direction; WAN 200 Mbit/s x 50 ms is 1.25 MB
POLL_S = 0.05  # how often blocked threads look at the stop flag and the control file


class Delay:
    """The current one-way delay in seconds, re-read from the control file when it changes."""

    def __init__(self, control: Path | None, delay_ms: float = 0.0) -> None:
        self.control, self.seconds, self._mtime = control, delay_ms / 1000.0, None

    def refresh(self) -> None:
        if self.control is None:
            return
        try:
            mtime = self.control.stat().st_mtime_ns
            if mtime != self._mtime:
                self.seconds = max(0.0, float(json.loads(self.control.read_text())["delay_ms"]) / 1000.0)
                self._mtime = mtime
        except (OSError, ValueError, KeyError, TypeError):
            pass  # being rewritten (the bench renames a new file in place): keep the last value


class _Queue:
    """FIFO of (arrival time, bytes) bounded by the bytes it holds; None marks the end of the stream."""

    def __init__(self, stop: threading.Event) -> None:
        self.items: deque[tuple[float, bytes | None]] = deque()
        self.held = 0
        self.cond = threading.Condition()
        self.stop = stop

    def put(self, item: tuple[float, bytes | None]) -> bool:
        with self.cond:
            while self.held >= QUEUE_BYTES and not self.stop.is_set():
                self.cond.wait(POLL_S)
            self.items.append(item)
            self.held += len(item[1] or b"")
            self.cond.notify_all()
            return not self.stop.is_set()

    def get(self) -> tuple[float, bytes | None] | None:
        with self.cond:
            while not self.items:
                if self.stop.is_set():
                    return None
                self.cond.wait(POLL_S)
            item = self.items.popleft()
            self.held -= len(item[1] or b"")
            self.cond.notify_all()
            return item


def _pump(src: socket.socket, dst: socket.socket, delay: Delay, stop: threading.Event) -> list[threading.Thread]:
    """Two threads moving src -> dst with the delay; any error or EOF ends this connection's both ways."""
    queue = _Queue(stop)

    def read() -> None:
        try:
            while not stop.is_set():
                data = src.recv(CHUNK)
                if not queue.put((time.monotonic(), data or None)) or not data:
                    return
        except OSError:
            stop.set()

    def write() -> None:
        try:
            while (item := queue.get()) is not None:
                arrived, data = item
                if data is None:  # the sender closed its side: pass the half-close on, in order
                    dst.shutdown(socket.SHUT_WR)
                    return
                while (wait := arrived + delay.seconds - time.monotonic()) > 0 and not stop.is_set():
                    time.sleep(min(wait, POLL_S))
                dst.sendall(data)
        except OSError:
            pass
        stop.set()  # a writer that cannot deliver ends the connection (both directions)

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=write, daemon=True)]
    for t in threads:
        t.start()
    return threads


def _serve_connection(client: socket.socket, upstream: tuple[str, int], delay: Delay, done: threading.Event) -> None:
    stop = threading.Event()
    try:
        server = socket.create_connection(upstream, timeout=5)
    except OSError:
        client.close()
        return
    for s in (client, server):
        s.settimeout(None)  # blocking: a slow receiver must slow the relay down, never time it out
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the delay is ours alone, not Nagle's
    threads = _pump(client, server, delay, stop) + _pump(server, client, delay, stop)
    while not stop.is_set() and not done.is_set() and any(t.is_alive() for t in threads):
        stop.wait(POLL_S)
    stop.set()
    for s in (client, server):  # wakes a thread blocked in recv or sendall
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    for t in threads:
        t.join(timeout=1)
    client.close()
    server.close()


def serve(lsock: socket.socket, upstream: tuple[str, int], delay: Delay, lifetime_s: float,
          done: threading.Event | None = None, ready: threading.Event | None = None) -> None:
    """Accept on the listening socket ``lsock`` and relay connections until ``done`` is set or
    ``lifetime_s`` has passed; closes ``lsock``."""
    done = done or threading.Event()
    deadline = time.monotonic() + lifetime_s
    with lsock:
        lsock.settimeout(POLL_S)
        if ready is not None:
            ready.set()
        while not done.is_set() and time.monotonic() < deadline:
            delay.refresh()
            try:
                client, _ = lsock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=_serve_connection, args=(client, upstream, delay, done), daemon=True).start()
    done.set()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--upstream", type=_address, required=True)
    parser.add_argument("--control", type=Path, help='JSON file {"delay_ms": x}, re-read when it changes')
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay until the control file says otherwise")
    parser.add_argument("--lifetime-s", type=float, default=3600.0)
    parser.add_argument("--ready-file", type=Path, help="created once the relay listens (it may run in another namespace)")
    args = parser.parse_args(argv)
    done, ready = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    if args.ready_file is not None:
        def announce() -> None:
            if ready.wait(30):
                args.ready_file.touch()
        threading.Thread(target=announce, daemon=True).start()
    serve(socket.create_server(args.listen), args.upstream, Delay(args.control, args.delay_ms), args.lifetime_s, done, ready)


if __name__ == "__main__":
    main()
