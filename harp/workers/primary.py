"""The primary: HaRP's twistd process when ``HP_WORKERS`` > 1.

It keeps the authoritative state, the FRP server and its tunnel ports, binds the ExApp
frontends and spawns the workers that serve them (:class:`WorkerPool`).  It serves no
HTTP itself, so the FRP side and the state never wait behind request work.

**Listening sockets.**  The primary binds ``HP_EXAPPS_ADDRESS`` (and the HTTPS address)
once, before the reactor runs, so a bad address is still one line and exit code 2, and
hands the listening sockets to every worker as inherited file descriptors, which the
worker adopts (``reactor.adoptStreamPort``).  The kernel then spreads connections over
the processes that wait in ``accept``.  ``SO_REUSEPORT`` was not chosen: each worker
would bind on its own, so a bind error would surface in a child after start-up, a
restarted worker would briefly leave a hash bucket without a listener, and connections
queued on a dying worker's socket would be reset.  One shared socket has none of this:
a worker that dies loses only the connections it had accepted.

**Channel.**  One AMP connection per worker over a ``socketpair`` created for it
(:mod:`harp.workers.commands`): nothing listens, not even on a unix path, and only that
child inherits its end.  Through it the primary

* counts every worker's failures in the authoritative state and sends each new ban,
  with its remaining time, to every worker (also bans from FRP logins and, with
  ``HP_REDIS_URL``, from other replicas);
* applies ``/exapp_storage`` pushes and deletes, sends them to every worker and answers
  the asking worker once all have acknowledged (so the 200/204 is sent only when every
  worker serves the change); with Redis, changes made by other replicas are passed on too;
* tells the workers which loopback ports have a live FRP tunnel (Docker engines are
  checked against it; ExApps are reached on ``127.0.0.1:port`` over loopback);
* answers ``/metrics`` for the whole: every worker's counters plus its own gauges.

**Lifecycle.**  A worker starts serving only after it has received the snapshot
(registry, bans, tunnel ports).  A worker that exits while HaRP runs is logged and
started again (after a growing pause if it keeps dying young); the others keep
serving.  ``SIGHUP`` is forwarded to every worker (each reloads its HTTPS
certificate).  At stop the primary closes its copies of the listening sockets, sends
``SIGTERM`` to every worker, and waits for them (``SIGKILL`` after
:data:`STOP_GRACE` seconds).
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.protocols import amp
from twisted.python.failure import Failure

from harp import logs
from harp.config import Address, Settings
from harp.exapps import ExAppRecord, RecordError
from harp.frp.tunnels import TunnelRegistry
from harp.metrics import Metrics
from harp.state.memory import MemoryState
from harp.workers import commands
from harp.workers.primary_state import (
    PrimaryMemoryState,
    PrimaryRedisState,
    PrimaryState,
)

log = logs.HarpLogger("harp.workers")

#: How long a stopping worker may take before it is killed.
STOP_GRACE: Final = 20.0
#: How long a worker may take to acknowledge a registry change.
ACK_TIMEOUT: Final = 10.0
#: A worker that lived less than this is restarted after a growing pause.
YOUNG: Final = 10.0
RESTART_MAX_PAUSE: Final = 30.0
LISTEN_BACKLOG: Final = 1024


# --------------------------------------------------------------------------- channel


class PrimaryChannel(amp.AMP):
    """The primary's end of one worker's channel."""

    def __init__(self, pool: WorkerPool, slot: Slot) -> None:
        super().__init__()
        self.pool = pool
        self.slot = slot

    @commands.RecordFailure.responder  # type: ignore[misc]
    def record_failure(self, key: str) -> dict[str, Any]:
        self.pool.state.record_failure(key)
        return {}

    @commands.PutExApp.responder  # type: ignore[misc]
    def put_exapp(self, app: str, record: bytes) -> Deferred[dict[str, Any]]:
        return self.pool.put(app, record).addCallback(lambda _: {})

    @commands.DeleteExApp.responder  # type: ignore[misc]
    def delete_exapp(self, app: str) -> Deferred[dict[str, Any]]:
        return self.pool.delete(app).addCallback(lambda found: {"found": found})

    @commands.CollectMetrics.responder  # type: ignore[misc]
    def collect_metrics(self) -> Deferred[dict[str, Any]]:
        return self.pool.render_metrics().addCallback(lambda text: {"text": text})

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        if self.slot.channel is self:
            self.slot.channel = None


# --------------------------------------------------------------------------- processes


@dataclass(eq=False)
class Slot:
    """One worker place: the process currently in it and its channel."""

    index: int
    process: Any = None
    pid: int | None = None
    channel: PrimaryChannel | None = None
    started: float = 0.0
    pause: float = 0.0
    restart: IDelayedCall | None = None
    ended: list[Deferred[None]] = field(default_factory=list)


class WorkerProcess(ProcessProtocol):
    def __init__(self, pool: WorkerPool, slot: Slot) -> None:
        self.pool = pool
        self.slot = slot

    def processEnded(self, reason: Failure) -> None:
        self.pool.ended(self.slot, reason)


class WorkerPool(Service):
    """Binds the ExApp frontends, spawns ``HP_WORKERS`` workers and is their primary."""

    def __init__(
        self, settings: Settings, env: dict[str, str], state: MemoryState,
        tunnels: TunnelRegistry, *, https: bool,
    ) -> None:
        assert isinstance(state, PrimaryMemoryState | PrimaryRedisState)
        self.settings = settings
        self.env = env
        self.state: PrimaryState = state
        self.tunnels = tunnels
        self.https = https
        self.sockets: dict[str, socket.socket] = {}
        self.slots = [Slot(i) for i in range(1, settings.workers + 1)]
        self.stopping = False
        self.setName("workers")

    # --- start

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if not self.sockets:
            self._bind("HP_EXAPPS_ADDRESS", self.settings.exapps_address)
            if self.https:
                self._bind("HP_EXAPPS_HTTPS_ADDRESS", self.settings.exapps_https_address)

    def _bind(self, variable: str, address: Address) -> None:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address.host, address.port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            sys.stderr.write(
                f"harp: configuration error: {variable}={str(address)!r}: "
                f"cannot listen ({exc.strerror or exc})\n"
            )
            sys.stderr.flush()
            raise SystemExit(2) from None
        sock.setblocking(False)
        self.sockets[variable] = sock
        log.info("{name} listening on {address} ({n} workers)", name=variable,
                 address=address, n=len(self.slots))

    def startService(self) -> None:
        super().startService()
        if not self.sockets:
            self.privilegedStartService()
        self.state.listener = self  # type: ignore[assignment]
        self.tunnels.on_change = self.tunnels_changed
        if self.https:
            signal.signal(signal.SIGHUP, self._on_sighup)
        for slot in self.slots:
            self.spawn(slot)

    def spawn(self, slot: Slot) -> None:
        slot.restart = None
        if self.stopping:
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = PrimaryChannel(self, slot)
        reactor.adoptStreamConnection(  # type: ignore[attr-defined]
            parent.fileno(), socket.AF_UNIX, commands.OneProtocol(channel)
        )
        parent.close()
        child_fds: dict[int, int | str] = {1: 1, 2: 2, 3: child.fileno()}
        args = [sys.executable, "-m", "harp.workers.worker", str(slot.index), "--channel", "3"]
        fd = 4
        for variable, sock in self.sockets.items():
            child_fds[fd] = sock.fileno()
            args += ["--listen", f"{variable}={fd}:{int(sock.family)}"]
            fd += 1
        slot.process = reactor.spawnProcess(  # type: ignore[attr-defined]
            WorkerProcess(self, slot), sys.executable, args, env=self.env, childFDs=child_fds
        )
        child.close()
        slot.pid = slot.process.pid
        slot.channel = channel
        slot.started = time.monotonic()
        log.info("worker {n} started (pid {pid})", n=slot.index, pid=slot.pid)
        self._sync(channel)

    def _sync(self, channel: PrimaryChannel) -> None:
        """Send the snapshot (registry, bans, tunnel ports), then :class:`Ready`."""
        for app, record in list(self.state.records.items()):
            channel.callRemote(
                commands.SetExApp, app=app, record=commands.record_json(record)
            ).addErrback(lambda _: None)
        for key, seconds in self.state.snapshot_bans():
            channel.callRemote(commands.Ban, key=key, seconds=seconds)
        channel.callRemote(commands.TunnelPorts, ports=self.tunnels.ports())
        channel.callRemote(commands.Ready).addErrback(lambda _: None)

    # --- workers ending

    def ended(self, slot: Slot, reason: Failure) -> None:
        pid, slot.process, slot.pid = slot.pid, None, None
        channel, slot.channel = slot.channel, None
        if channel is not None and channel.transport is not None:
            channel.transport.loseConnection()
        waiting, slot.ended = slot.ended, []
        for d in waiting:
            d.callback(None)
        status = _describe(reason)
        if self.stopping:
            log.info("worker {n} (pid {pid}) stopped: {status}", n=slot.index, pid=pid,
                     status=status)
            return
        lived = time.monotonic() - slot.started
        slot.pause = 0.1 if lived >= YOUNG else min(RESTART_MAX_PAUSE, max(1.0, slot.pause * 2))
        log.error("worker {n} (pid {pid}) exited ({status}); restarting it in {pause:g}s",
                  n=slot.index, pid=pid, status=status, pause=slot.pause)
        slot.restart = reactor.callLater(slot.pause, self.spawn, slot)  # type: ignore[attr-defined]

    # --- stop

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stopping = True
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        waiting: list[Deferred[None]] = []
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
            if slot.process is None:
                continue
            d: Deferred[None] = Deferred()
            slot.ended.append(d)
            waiting.append(d)
            _signal(slot.process, "TERM")
        if not waiting:
            return succeed(None)
        kill = reactor.callLater(STOP_GRACE, self._kill_all)  # type: ignore[attr-defined]

        def done(_: object) -> None:
            if kill.active():
                kill.cancel()

        return DeferredList(waiting).addCallback(done)

    def _kill_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                log.warn("worker {n} (pid {pid}) did not stop in {s:g}s: killing it",
                         n=slot.index, pid=slot.pid, s=STOP_GRACE)
                _signal(slot.process, "KILL")

    # --- signals

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(self.forward_sighup)  # type: ignore[attr-defined]

    def forward_sighup(self) -> None:
        n = 0
        for slot in self.slots:
            if slot.process is not None:
                _signal(slot.process, "HUP")
                n += 1
        log.warn("SIGHUP: asked {n} workers to reload the HTTPS certificate", n=n)

    # --- the state, shared

    def _channels(self) -> list[PrimaryChannel]:
        return [slot.channel for slot in self.slots if slot.channel is not None]

    def banned(self, key: str, seconds: float) -> None:
        for channel in self._channels():
            channel.callRemote(commands.Ban, key=key, seconds=seconds)

    def exapp_changed(self, app_id: str) -> None:
        self._broadcast(app_id, self.state.records.get(app_id))

    def tunnels_changed(self) -> None:
        ports = self.tunnels.ports()
        for channel in self._channels():
            channel.callRemote(commands.TunnelPorts, ports=ports)

    def _broadcast(self, app_id: str, record: ExAppRecord | None) -> Deferred[bool]:
        """Every worker holds ``record`` (or has dropped it) when this fires; True if any
        worker held the app before."""
        raw = None if record is None else commands.record_json(record)
        calls = [
            channel.callRemote(commands.SetExApp, app=app_id, record=raw)
            .addTimeout(ACK_TIMEOUT, reactor)  # type: ignore[arg-type]
            for channel in self._channels()
        ]
        d = DeferredList(calls, consumeErrors=True)
        return d.addCallback(
            lambda results: any(ok and reply.get("held") for ok, reply in results)
        )

    def put(self, app_id: str, raw: bytes) -> Deferred[None]:
        try:
            record = commands.parse_record_json(app_id, raw)
        except (ValueError, RecordError) as exc:  # the worker validated it: a bug
            log.error("worker sent an invalid ExApp record for {app}: {e}", app=app_id, e=exc)
            return succeed(None)
        self.state.put_exapp(app_id, record)
        log.info("ExApp {app} registered: {host}:{port}, {n} routes", app=app_id,
                 host=record.host, port=record.port, n=len(record.routes))
        return self._broadcast(app_id, record).addCallback(lambda _: None)

    def delete(self, app_id: str) -> Deferred[bool]:
        found = self.state.delete_exapp(app_id)

        def done(held: bool) -> bool:
            if found or held:
                log.info("ExApp {app} removed", app=app_id)
            return found or held

        return self._broadcast(app_id, None).addCallback(done)

    # --- metrics

    def render_metrics(self) -> Deferred[bytes]:
        """Every worker's counters and the primary's gauges, rendered."""
        calls = [channel.callRemote(commands.Counters) for channel in self._channels()]

        def render(results: list[tuple[bool, Any]]) -> bytes:
            shares = [json.loads(reply["data"]) for ok, reply in results if ok]
            metrics = Metrics()
            metrics.add_counters(shares)
            from harp.service import add_gauges

            connections = sum(int(share.get("connections", 0)) for share in shares)
            add_gauges(metrics, self.tunnels, self.state, lambda: connections)
            return metrics.render()

        return DeferredList(calls, consumeErrors=True).addCallback(render)


def _signal(process: Any, name: str) -> None:
    try:
        process.signalProcess(name)
    except Exception:  # noqa: S110 - the process is already gone
        pass


def _describe(reason: Failure) -> str:
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit code {getattr(value, 'exitCode', '?')}"

