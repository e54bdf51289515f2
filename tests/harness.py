"""An in-process federation for fast, deterministic recovery tests.

The real roles, run as threads of the test process instead of OS processes: the broker's and the
trunk workers' own poll loops (``Broker.run``, ``TrunkWorker.run``), and real silo agents, each in
a thread of its own that the test drives one call at a time (``silo.step(3)``, ``silo.end_round(1)``),
so the test decides exactly what happens between two steps. Everything under them is real: Redis
(the test's own key prefix), ZeroMQ sockets on random loopback ports with LINGER 0, end-to-end
encryption with throwaway keys enrolled as an operator would, round checkpoints on disk, and a
tiny model built from a config.

Faults land at exact points, not by luck of timing:

* ``Gate`` -- the first trunk worker that meets a given message stops dead there: it neither
  answers nor heartbeats (over ZeroMQ, nor its liveness key in Redis), as a frozen or killed process
  looks from outside. ``gate.release()`` lets it go on (a worker that was only slow) or
  ``gate.release(deliver=False)`` drops that message (one that crashed while holding it);
* ``Cluster.restart_worker`` / ``Cluster.restart_broker`` / ``Cluster.restart_silo``: a role
  started again in place (same id and address, a new process incarnation; a broker over the same
  Redis state);
* ``ScriptedSilo`` -- a bare DEALER that speaks the wire protocol itself (registration token,
  handshake and sealed frames of its own real session), for events no well-behaved agent makes on cue.

Nothing here replaces a role's logic: the harness only starts roles, paces silos, and watches.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq

from broker.broker import Broker
from shared.state import checkpoint
from shared.crypto import keys as keystore
from shared.crypto import enrollment
from shared.crypto.handshake import make_hello
from shared.wire.protocol import Kind
from shared.crypto.registration import sign_registration
from shared.state.registry import Registry
from shared.state.run_config import agree_with_run, claim_line, config_digest, run_config
from shared.crypto.sealed_codec import SealedCodec
from shared.runtime.settings import BrokerSettings, SiloSettings, TrunkSettings
from shared.wire.transport import client_socket
from shared.wire.wire import FrameError, Message, header_from_wire
from silo_agent.agent import Reregister, Rollback, SiloAgent
from trunk_worker.beacon import Beacon
from trunk_worker.worker import TrunkWorker

RUN = "recovery"
WAIT_S = 30.0  # the longest any harness wait may take before the test fails (a hang, not a slow machine)
_silo_starts = itertools.count()  # names each silo agent's thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout_s: float = WAIT_S, poll_s: float = 0.02):
    """Poll ``condition()`` until it returns something truthy (returned), failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


@dataclass
class ClusterConfig:
    mode: str = "serial"
    silos: int = 1
    workers: int = 1
    local_steps: int = 4
    heartbeat_s: float = 0.2
    liveness_ttl_s: int = 2  # a silent worker is purged after this long
    batch_window_ms: int = 10000
    straggler_timeout_s: float = 60.0
    step_timeout_s: float = WAIT_S
    round_timeout_s: float = 60.0
    batch_size: int = 2
    max_length: int = 32
    examples: int = 8
    seed: int = 3
    extra: dict = field(default_factory=dict)  # more settings for every role that has them

    @property
    def silo_ids(self) -> list[str]:
        return [f"silo{i}" for i in range(self.silos)]

    @property
    def worker_ids(self) -> list[str]:
        return [f"trunk{i}" for i in range(self.workers)]


class Gate:
    """Stops the first trunk worker whose message matches, at that message, until released.

    ``at="receive"``: before the worker handles a message it received of ``kind`` (and ``step``);
    ``at="send"``: before it sends one. While stopped, that worker's thread is parked (its loop
    sends nothing, heartbeats included) and its Redis liveness key is no longer refreshed."""

    def __init__(self, kind: Kind, step: int | None = None, at: str = "receive") -> None:
        if at not in ("receive", "send"):
            raise ValueError(at)
        self.kind, self.step, self.at = kind, step, at
        self.worker: str | None = None  # who stopped here
        self.stopped = threading.Event()
        self._released = threading.Event()
        self._deliver = True
        self._lock = threading.Lock()

    def matches(self, at: str, kind: Kind, step: int) -> bool:
        return at == self.at and kind == self.kind and (self.step is None or step == self.step)

    def hold(self, worker: HarnessWorker) -> bool:
        """Called by a worker at a matching message: park it (the first one only). True: go on with
        the message once released; False: drop it."""
        with self._lock:
            if self.worker is not None:
                return True
            self.worker = worker.settings.worker_id
        worker.registry.frozen.set()
        self.stopped.set()
        self._released.wait()
        worker.registry.frozen.clear()
        return self._deliver

    def wait_stopped(self, timeout_s: float = WAIT_S) -> str:
        if not self.stopped.wait(timeout_s):
            raise AssertionError(f"no trunk worker reached the gate ({self.at} {self.kind.name} step {self.step})")
        return self.worker

    def release(self, deliver: bool = True) -> None:
        self._deliver = deliver
        self._released.set()


class RoleRegistry(Registry):
    """One role's own Redis client, as in its own process. While its role is frozen (by a Gate), its
    heartbeat thread refreshes nothing, as a stopped process would not."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.frozen = threading.Event()

    def heartbeat(self, role: str, member: str, ttl_s: int) -> None:
        if not self.frozen.is_set():
            super().heartbeat(role, member, ttl_s)


class HarnessWorker(TrunkWorker):
    """The real trunk worker, recording what it receives and each client-batch update's members,
    and stopping at the cluster's gates."""

    def __init__(self, settings: TrunkSettings, registry: RoleRegistry, model_dir: Path, gates: list[Gate]) -> None:
        self.gates = gates
        self.received: list[tuple[Kind, str, int, int, str]] = []  # (kind, silo/worker id, round, step, text)
        self.bundles: list[dict] = []  # client-batch: per update, the step, its members, who sent a gradient
        super().__init__(settings, registry, model_dir)
        if hasattr(self.steps, "finish_bundle"):
            self._record_bundles()

    def handle(self, frames: list) -> None:
        try:
            h = header_from_wire(frames[0], self.settings.max_tensor_bytes)
        except (FrameError, IndexError):
            return super().handle(frames)  # garbage: the worker's own handling
        text = bytes(frames[-1]).decode("utf-8", "replace") if h.has_text and not h.sealed else ""
        self.received.append((h.kind, h.silo_id, h.round, h.step, text))
        if not self._pass_gates("receive", h.kind, h.step):
            return
        super().handle(frames)

    def _send(self, msg: Message) -> None:
        if self._pass_gates("send", msg.kind, msg.step):
            super()._send(msg)

    def _record_bundles(self) -> None:
        """Client-batch: each update's members are recorded as the runner finishes its bundle."""
        finish = self.steps.finish_bundle

        def recorded(bundle) -> None:
            self.bundles.append({"step": bundle.members[0].step, "members": sorted(bundle.silos),
                                 "gradients": sorted(bundle.grads)})
            finish(bundle)

        self.steps.finish_bundle = recorded

    def _start_beacon(self) -> Beacon:
        """The worker's beacon thread goes quiet while a Gate holds the worker, as a stopped process's would."""
        frozen = self.registry.frozen
        beacon = Beacon(self.ctx, self.settings)
        beacon.beating = lambda: not frozen.is_set()
        return beacon.start()

    def _pass_gates(self, at: str, kind: Kind, step: int) -> bool:
        return all(g.hold(self) for g in self.gates if g.matches(at, kind, step))

    def kinds(self, kind: Kind) -> list[tuple]:
        return [r for r in self.received if r[0] == kind]


class RoleThread:
    """A broker or trunk worker: built and run in a thread of its own (sockets never change threads)."""

    def __init__(self, name: str, build) -> None:
        self.name = name
        self.role = None
        self.error: BaseException | None = None
        built = threading.Event()

        def main() -> None:
            try:
                self.role = build()
            except BaseException as exc:  # noqa: BLE001  (reported to the test below)
                self.error = exc
                built.set()
                return
            built.set()
            try:
                self.role.run()
            except BaseException as exc:  # noqa: BLE001  (a role that dies fails the test)
                self.error = exc

        self.thread = threading.Thread(target=main, name=name, daemon=True)
        self.thread.start()
        if not built.wait(WAIT_S):
            raise AssertionError(f"{name} was not built within {WAIT_S:.0f}s")
        if self.error is not None:
            raise self.error

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.role is not None:
            self.role.stop() if hasattr(self.role, "stop") else setattr(self.role, "_stopping", True)
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise AssertionError(f"{self.name} did not stop within {timeout_s:.0f}s")


class SiloDriver:
    """A real silo agent in a thread of its own, driven by the test one call at a time.

    ``step``/``end_round`` are the agent's own ``train_step``/``_end_round``; ``recover`` does what
    its run loop does with a ROLLBACK or a "register" answer. ``submit`` runs a call without waiting
    (two silos of client-batch, or a round's aggregation, need each other at the same time)."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster, self.silo_id = cluster, f"silo{index}"
        self.errors: list[dict] = []  # every ERROR the agent received: (round, step, text)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"{self.silo_id}.{next(_silo_starts)}")
        self.agent: SiloAgent = self.pool.submit(self._build, index).result(WAIT_S)

    def _build(self, index: int) -> SiloAgent:
        c = self.cluster
        settings = c.settings(SiloSettings, silo_id=self.silo_id, silo_index=index, broker_frontend=c.front,
                              data=c.data[index], steps=1000, local_steps=c.cfg.local_steps,
                              batch_size=c.cfg.batch_size, max_length=c.cfg.max_length,
                              step_timeout_s=c.cfg.step_timeout_s, keys_dir=c.tmp / "keys" / self.silo_id,
                              trunk_fingerprint=c.trunk_keys.fingerprint, checkpoint_dir=c.tmp / "checkpoints")
        agent = SiloAgent(settings, c.model_dir)
        decode = agent.codec.decode

        def watched(frames):  # observe what the agent is told (it decides what to do with it)
            msg = decode(frames)
            if msg.kind == Kind.ERROR:
                self.errors.append({"round": msg.round, "step": msg.step, "text": msg.text or ""})
            return msg

        agent.codec.decode = watched
        return agent

    def submit(self, fn, *args) -> Future:
        return self.pool.submit(fn, *args)

    def call(self, fn, *args, timeout_s: float = WAIT_S):
        return self.submit(fn, *args).result(timeout_s)

    def start(self) -> int:
        """What ``SiloAgent.run`` does before its first step: the initial checkpoint, READY, resume.
        Returns the next step."""
        def start() -> int:
            a = self.agent
            if not checkpoint.rounds_on_disk(a._checkpoints):
                a._save_checkpoint(-1)
            return a._resume(a._register())
        return self.call(start)

    def step(self, step: int) -> float:
        return self.call(self.agent.train_step, step)

    def end_round(self, rnd: int) -> None:
        return self.call(self.agent._end_round, rnd)

    def recover(self, exc: BaseException) -> int:
        """The run loop's answer to a Rollback or a Reregister; returns the step to go on from."""
        a = self.agent

        def recover() -> int:
            if isinstance(exc, Rollback):
                a._register()
                return a._resume(exc.round)
            if isinstance(exc, Reregister):
                return a._resume(a._register())
            raise exc
        return self.call(recover)

    @property
    def history(self) -> list[dict]:
        return self.agent.history

    def close(self) -> None:
        try:
            self.pool.submit(self.agent.sock.close).result(WAIT_S)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)


class ScriptedSilo:
    """A silo played by the test on a bare DEALER: real registration token, real handshake, frames
    sealed with its own real session, sent exactly when and as the test says."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster, self.silo_id = cluster, f"silo{index}"
        c = cluster
        self.keys = keystore.load_silo_keys(c.tmp / "keys" / self.silo_id)
        self.settings = c.settings(SiloSettings, silo_id=self.silo_id)
        self.config = run_config(self.settings)
        self.codec = SealedCodec(self.settings.max_tensor_bytes)
        self.sock = client_socket(zmq.Context.instance(), self.silo_id, c.front, False)
        self.incarnation = f"scripted{index}"

    def send(self, msg: Message) -> None:
        self.sock.send_multipart(self.codec.encode(msg), copy=False)

    def recv(self, timeout_s: float = WAIT_S, kinds: tuple[Kind, ...] | None = None) -> Message:
        """The next message (of ``kinds``), broker heartbeats skipped."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise AssertionError(f"{self.silo_id}: nothing ({kinds}) within {timeout_s:.0f}s")
            msg = self.codec.decode(self.sock.recv_multipart())
            if msg.kind != Kind.HEARTBEAT and (kinds is None or msg.kind in kinds):
                return msg

    def ready(self) -> Message:
        token = torch.frombuffer(bytearray(sign_registration(self.keys, RUN, self.silo_id)), dtype=torch.uint8)
        self.send(Message(Kind.READY, RUN, self.silo_id, tensors=[token],
                          text=f"incarnation={self.incarnation}\n{claim_line(self.config)}"))
        return self.recv(kinds=(Kind.READY, Kind.ERROR))

    def handshake(self, rnd: int, step: int = 0) -> None:
        s = self.settings
        hello, pending = make_hello(self.keys, self.silo_id, RUN, rnd, cipher=s.cipher,
                                    max_tensor_bytes=s.max_tensor_bytes, config_digest=config_digest(self.config))
        self.send(Message(Kind.HELLO, RUN, self.silo_id, rnd, step,
                          tensors=[torch.frombuffer(bytearray(hello), dtype=torch.uint8)], text=claim_line(self.config)))
        ack = self.recv(kinds=(Kind.HELLO_ACK, Kind.ERROR))
        assert ack.kind == Kind.HELLO_ACK, ack.text
        self.codec.sessions.add(pending.complete_ack(bytes(ack.tensors[0].numpy()), self.cluster.trunk_keys.fingerprint))

    def forward(self, rnd: int, step: int, rows: int = 2, tokens: int = 6) -> None:
        """A FORWARD of well-formed activations (what a head would send; their values do not matter here)."""
        hidden = torch.randn(rows, tokens, self.cluster.hidden_size, generator=torch.Generator().manual_seed(step))
        mask = torch.ones(rows, tokens, dtype=torch.uint8)
        positions = torch.arange(tokens, dtype=torch.int32).expand(rows, tokens).contiguous()
        self.send(Message(Kind.FORWARD, RUN, self.silo_id, rnd, step, tensors=[hidden, mask, positions]))

    def close(self) -> None:
        self.sock.close()


class Cluster:
    """Broker, trunk workers and silos of one run. Silos are added by the test (``silo``/``scripted``)."""

    def __init__(self, tmp: Path, prefix: str, redis_url: str, model_dir: Path, cfg: ClusterConfig) -> None:
        self.tmp, self.prefix, self.redis_url, self.model_dir, self.cfg = tmp, prefix, redis_url, model_dir, cfg
        self.gates: list[Gate] = []
        self.registry = Registry(redis_url, prefix, RUN)  # the test's own view of Redis
        self.registry.create_run({"mode": cfg.mode, "silos": ",".join(cfg.silo_ids), "local_steps": cfg.local_steps})
        self.trunk_keys = keystore.generate_trunk_keys(tmp / "keys" / "trunk")
        for sid in cfg.silo_ids:  # enrolled by the operator before the run
            silo = keystore.generate_silo_keys(tmp / "keys" / sid)
            enrollment.enroll(self.registry, sid, silo.identity_public, silo.x25519_public)
        self.data = []
        for i in range(cfg.silos):
            path = tmp / "data" / f"silo{i}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"prompt": f"Case {i}.{k}: notes " + "x " * (k % 3),
                                                "completion": f" code {(k + i) % 5}"}) + "\n"
                                    for k in range(cfg.examples)))
            self.data.append(path)
        self.front, self.back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        self.hidden_size = json.loads((model_dir / "config.json").read_text())["hidden_size"]
        self.broker_thread: RoleThread | None = None
        self.worker_threads: dict[str, RoleThread] = {}
        self.silos: list[SiloDriver] = []
        self.scripted_silos: list[ScriptedSilo] = []

    # ------------------------------------------------------------------ roles
    def settings(self, cls, **kw):
        c = self.cfg
        common = dict(redis_url=self.redis_url, key_prefix=self.prefix, run_id=RUN, heartbeat_s=c.heartbeat_s,
                      liveness_ttl_s=c.liveness_ttl_s, model="tiny", seed=c.seed)
        extra = {k: v for k, v in c.extra.items() if k in cls.model_fields}
        return cls(**{k: v for k, v in {**common, **extra}.items() if k in cls.model_fields}, **kw)

    def registry_for(self) -> RoleRegistry:
        return RoleRegistry(self.redis_url, self.prefix, RUN)

    def start(self) -> Cluster:
        self.start_broker()
        for wid in self.cfg.worker_ids:
            self.start_worker(wid)
        return self

    def start_broker(self) -> Broker:
        c = self.cfg
        settings = self.settings(BrokerSettings, frontend_bind=self.front, backend_bind=self.back, mode=c.mode,
                                 silos=",".join(c.silo_ids), batch_window_ms=c.batch_window_ms,
                                 round_timeout_s=c.round_timeout_s)

        def build() -> Broker:
            registry = self.registry_for()
            agree_with_run(registry, settings, "broker")
            deadline = time.monotonic() + 5
            while True:
                try:
                    return Broker(settings, registry, c.silo_ids, c.local_steps)
                except zmq.ZMQError as exc:  # a restart: the old broker's ports may take a moment to free
                    if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

        self.broker_thread = RoleThread("broker", build)
        return self.broker

    def start_worker(self, worker_id: str) -> HarnessWorker:
        c = self.cfg
        settings = self.settings(TrunkSettings, worker_id=worker_id, broker_backend=self.back, mode=c.mode,
                                 straggler_timeout_s=c.straggler_timeout_s, keys_dir=self.tmp / "keys" / "trunk",
                                 checkpoint_dir=self.tmp / "checkpoints")

        def build() -> HarnessWorker:
            registry = self.registry_for()
            agree_with_run(registry, settings, "trunk")
            return HarnessWorker(settings, registry, self.model_dir, self.gates)

        self.worker_threads[worker_id] = RoleThread(worker_id, build)
        worker = self.worker(worker_id)
        # registered once the broker has answered this process's own READY (a restarted worker's
        # id is known to the broker before that: it is the old process's)
        wait_for(lambda: worker.kinds(Kind.READY), f"the broker to accept {worker_id}'s READY")
        return worker

    def silo(self, index: int) -> SiloDriver:
        driver = SiloDriver(self, index)
        self.silos.append(driver)
        return driver

    def scripted(self, index: int) -> ScriptedSilo:
        peer = ScriptedSilo(self, index)
        self.scripted_silos.append(peer)
        return peer

    @property
    def broker(self) -> Broker:
        return self.broker_thread.role

    def worker(self, worker_id: str = "trunk0") -> HarnessWorker:
        return self.worker_threads[worker_id].role

    # ------------------------------------------------------------------ faults
    def gate(self, kind: Kind, step: int | None = None, at: str = "receive") -> Gate:
        gate = Gate(kind, step, at)
        self.gates.append(gate)
        return gate

    def restart_worker(self, worker_id: str) -> HarnessWorker:
        """Stop a worker and start it again in place: same id, same checkpoints, a new incarnation."""
        self.worker_threads.pop(worker_id).stop()
        return self.start_worker(worker_id)

    def restart_broker(self) -> Broker:
        """Stop the broker and build a new one on the same ports, over the same Redis state."""
        self.broker_thread.stop()
        return self.start_broker()

    def restart_silo(self, driver: SiloDriver) -> SiloDriver:
        """A silo process started again: its old socket closed, a new agent (new incarnation)."""
        driver.close()
        self.silos.remove(driver)
        return self.silo(int(driver.silo_id.removeprefix("silo")))

    def rejected(self, reason: str) -> int:
        return self.registry.rejected().get(reason, 0)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Stop everything (each role even if another fails to stop); a role that died fails the test."""
        errors = []
        for gate in self.gates:
            gate.release(deliver=False)
        roles = [*self.silos, *self.scripted_silos, *self.worker_threads.values(),
                 *([self.broker_thread] if self.broker_thread is not None else [])]
        for role in roles:
            try:
                role.stop() if isinstance(role, RoleThread) else role.close()
            except Exception as exc:  # noqa: BLE001  (reported below, after the others stopped)
                errors.append(f"{getattr(role, 'name', getattr(role, 'silo_id', role))}: {exc!r}")
            if isinstance(role, RoleThread) and role.error is not None:
                errors.append(f"{role.name} died: {role.error!r}")
        if errors:
            raise AssertionError("; ".join(errors))


def tiny_model_dir(cache: Path) -> Path:
    """The 'tiny' preset every role resolves, cached under ``cache`` (SPLITFED_CACHE_DIR)."""
    from shared.model.models import resolve_model_dir

    old = os.environ.get("SPLITFED_CACHE_DIR")
    os.environ["SPLITFED_CACHE_DIR"] = str(cache)
    try:
        return resolve_model_dir("tiny")
    finally:
        if old is None:
            os.environ.pop("SPLITFED_CACHE_DIR")
        else:
            os.environ["SPLITFED_CACHE_DIR"] = old
