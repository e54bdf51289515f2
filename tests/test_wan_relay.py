"""The delaying relay of `splitfed bench wan` (splitfed/bench/wan_relay.py), on loopback.

Bytes come out in order and unchanged, each way; a round trip through it takes at least twice the
one-way delay (a lower bound only: how much longer is a benchmark's business, never a test's); a
new delay written to the control file takes effect; the relay stops by itself when told to.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from splitfed.bench.wan_relay import Delay, serve


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(10)

    def run() -> None:
        with lsock:
            conn, _ = lsock.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return lsock, thread


@pytest.fixture
def relay(tmp_path):
    """A relay on a loopback port in front of an echo server; yields (address, control file)."""
    upstream, echo = _echo_server()
    control = tmp_path / "relay.json"
    control.write_text('{"delay_ms": 20}')
    lsock = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()
    thread = threading.Thread(target=serve, args=(lsock, upstream.getsockname(), Delay(control), 60, done),
                              daemon=True)
    thread.start()
    yield lsock.getsockname(), control
    done.set()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the relay did not stop when told to"


def _round_trip(conn: socket.socket, payload: bytes) -> tuple[bytes, float]:
    started = time.monotonic()
    received = bytearray()
    sender = threading.Thread(target=conn.sendall, args=(payload,))  # both ways at once: no deadlock on buffers
    sender.start()
    while len(received) < len(payload):
        chunk = conn.recv(1 << 20)
        assert chunk, "the relay closed the connection early"
        received += chunk
    sender.join()
    return bytes(received), time.monotonic() - started


def test_bytes_arrive_in_order_and_no_sooner_than_the_delay(relay):
    address, _ = relay
    with socket.create_connection(address, timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = os.urandom(8 << 20)  # many chunks, both ways at once: order and content must hold
        echoed, _ = _round_trip(conn, payload)
        assert echoed == payload
        for _ in range(3):  # a small message: one chunk each way, each held for the one-way delay
            echoed, seconds = _round_trip(conn, b"ping")
            assert echoed == b"ping"
            assert seconds >= 2 * 0.020


def test_a_new_delay_in_the_control_file_takes_effect(relay):
    address, control = relay
    with socket.create_connection(address, timeout=30) as conn:
        tmp = control.with_suffix(".tmp")
        tmp.write_text('{"delay_ms": 100}')
        tmp.replace(control)
        time.sleep(0.3)  # the relay looks at the file every 50 ms
        _, seconds = _round_trip(conn, b"ping")
        assert seconds >= 2 * 0.100


def test_the_half_close_passes_through_after_the_data(relay):
    address, _ = relay
    with socket.create_connection(address, timeout=30) as conn:
        conn.sendall(b"last words")
        conn.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := conn.recv(100):
            received += chunk
        assert received == b"last words"  # the echo server saw EOF after the data, and closed
