"""The trunk worker's liveness beacon: HEARTBEATs to the broker from a thread and socket of its own.

The worker's loop heartbeats too, but not while it computes: a trunk step of a large model on a
busy CPU can outlast the broker's liveness_ttl_s, and the broker would purge a worker that is only
working. The beacon keeps beating meanwhile; a worker process that dies takes its beacon with it,
so the broker still notices within liveness_ttl_s. (A main loop that hangs forever with the
process alive is not caught by this: the step timeouts of its silos are.) ZeroMQ sockets are not
thread-safe, hence the second connection, identified as ``<worker id>/beacon``.
"""

from __future__ import annotations

import threading

import zmq

from shared.wire.protocol import BEACON_SUFFIX, Kind
from shared.runtime.settings import TrunkSettings
from shared.wire.transport import client_socket
from shared.wire.wire import Message, message_to_wire


class Beacon:
    def __init__(self, ctx: zmq.Context, settings: TrunkSettings) -> None:
        self.ctx, self.settings = ctx, settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trunk-beacon", daemon=True)

    def start(self) -> Beacon:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def beating(self) -> bool:
        """Whether to send this beat (always; the in-process test harness parks a worker with it)."""
        return True

    def _run(self) -> None:
        s = self.settings
        sock = client_socket(self.ctx, s.worker_id + BEACON_SUFFIX, s.broker_backend, s.curve, s.curve_cert,
                             s.curve_broker_key)
        sock.setsockopt(zmq.SNDHWM, 4)  # beats queued while the broker is down are worthless
        beat = message_to_wire(Message(Kind.HEARTBEAT, s.run_id, s.worker_id))
        try:
            while not self._stop.wait(s.heartbeat_s):
                if not self.beating():
                    continue
                try:
                    sock.send_multipart(beat, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass  # broker unreachable: the next beat tries again
        finally:
            sock.close()
