"""A worker: ``python -m harp.workers.worker INDEX --channel FD --listen VAR=FD:FAMILY ...``.

Started by the primary (:mod:`harp.workers.primary`), never by hand.  It reads the same
environment as the primary, builds the same request side as a single HaRP process
(:func:`harp.service.build_frontend`) over a :class:`~harp.workers.mirror.MirrorState`,
and starts serving the inherited listening sockets once the primary has sent its
snapshot.  Only three things differ from a single process, all wiring:

* ``/exapp_storage`` is forwarded to the primary and answered when every worker holds
  the change (:class:`ForwardingStorage`);
* ``/metrics`` is rendered by the primary, for all processes;
* FRP tunnels are reached over loopback (``127.0.0.1:port``): :class:`LoopbackTunnels`
  knows which ports are live, so a Docker engine port without a tunnel is still a 503.

``SIGTERM`` stops it (listeners first, then the client pools), ``SIGHUP`` reloads the
HTTPS certificate, ``SIGINT`` is ignored (a terminal's Ctrl-C reaches the whole process
group; the primary decides).  If the primary goes away, the worker stops.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from typing import IO, Any, Final

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    globalLogBeginner,
)
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from harp import logs
from harp.config import ConfigError, Settings
from harp.exapps import ExAppRecord
from harp.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from harp.tlsctx import ReloadableServerContext, TLSConfigError
from harp.tuning import tune
from harp.web import responses
from harp.web.https import TLSServerFactory
from harp.web.storage import app_id_of, read_record
from harp.workers import commands
from harp.workers.mirror import MirrorState

log = logs.HarpLogger("harp.workers")


class WorkerChannel(amp.AMP):
    """The worker's end of its channel: what the primary tells, what is asked of it."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker

    # --- primary -> worker

    @commands.Ready.responder  # type: ignore[misc]
    def ready(self) -> dict[str, Any]:
        self.worker.serve()
        return {}

    @commands.SetExApp.responder  # type: ignore[misc]
    def set_exapp(self, app: str, record: bytes | None) -> dict[str, Any]:
        parsed = None if record is None else commands.parse_record_json(app, record)
        return {"held": self.worker.state.apply_exapp(app, parsed)}

    @commands.Ban.responder  # type: ignore[misc]
    def ban(self, key: str, seconds: float) -> dict[str, Any]:
        self.worker.state.apply_ban(key, seconds)
        return {}

    @commands.TunnelPorts.responder  # type: ignore[misc]
    def tunnel_ports(self, ports: list[int]) -> dict[str, Any]:
        self.worker.tunnels.ports = frozenset(ports)
        return {}

    @commands.Counters.responder  # type: ignore[misc]
    def counters(self) -> dict[str, Any]:
        share = self.worker.frontend.metrics.counters()
        share["connections"] = self.worker.frontend.limit.open
        return {"data": json.dumps(share).encode()}

    # --- worker -> primary (harp.workers.mirror.Primary)

    def failure(self, key: str) -> None:
        if self.transport is not None:
            self.callRemote(commands.RecordFailure, key=key)

    def put(self, app_id: str, record: ExAppRecord) -> Deferred[None]:
        d: Deferred[Any] = self.callRemote(
            commands.PutExApp, app=app_id, record=commands.record_json(record)
        )
        return d.addCallback(lambda _: None)

    def delete(self, app_id: str) -> Deferred[bool]:
        d: Deferred[Any] = self.callRemote(commands.DeleteExApp, app=app_id)
        return d.addCallback(lambda reply: bool(reply["found"]))

    def metrics(self) -> Deferred[bytes]:
        d: Deferred[Any] = self.callRemote(commands.CollectMetrics)
        return d.addCallback(lambda reply: bytes(reply["text"]))

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.worker.primary_lost()


class LoopbackTunnels:
    """The ``TunnelLookup`` of a worker: live tunnel ports, reached over loopback."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.ports: frozenset[int] = frozenset()

    def endpoint_for(self, port: int) -> IStreamClientEndpoint | None:
        if port not in self.ports:
            return None
        return TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=self.timeout)


class ForwardingStorage:
    """``/exapp_storage`` in a worker: the primary applies it and shares it with every
    worker before the answer is sent."""

    def __init__(self, channel: WorkerChannel) -> None:
        self.channel = channel

    def post(self, request: Request, rest: bytes) -> bytes | int:
        parsed = read_record(request, rest)
        if isinstance(parsed, bytes):
            return parsed
        return self.put(request, *parsed)

    def put(self, request: Request, app_id: str, record: ExAppRecord) -> bytes | int:
        d = self.channel.put(app_id, record)
        d.addCallbacks(
            lambda _: _answer(request, 204), lambda failure: _unavailable(request, failure)
        )
        return NOT_DONE_YET

    def delete(self, request: Request, rest: bytes) -> bytes | int:
        app_id = app_id_of(rest)
        if app_id is None:
            return responses.error(request, 404)
        self.channel.delete(app_id).addCallbacks(
            lambda found: _answer(request, 204 if found else 404),
            lambda failure: _unavailable(request, failure),
        )
        return NOT_DONE_YET


def _answer(request: Request, status: int) -> None:
    if responses.gone(request):
        return
    body = responses.send(request, 204, b"") if status == 204 else responses.error(
        request, status
    )
    responses.finish(request, body)


def _unavailable(request: Request, failure: Failure) -> None:
    log.error("the primary did not answer: {error}", error=failure.getErrorMessage())
    _answer(request, 503)


@dataclass(frozen=True, slots=True)
class Listen:
    variable: str
    fd: int
    family: int


class Worker:
    def __init__(self, settings: Settings, index: int, channel_fd: int,
                 listens: list[Listen]) -> None:
        from harp.service import CertificateReloader, ClientPools, build_frontend

        self.settings = settings
        self.index = index
        self.listens = listens
        self.ports: list[IListeningPort] = []
        self.stopping = False
        self.exit_code = 0
        self.state = MirrorState(
            settings.blacklist_count, settings.blacklist_window, settings.session_lifetime
        )
        self.tunnels = LoopbackTunnels(settings.timeout_connect)
        self.channel = WorkerChannel(self)
        self.state.primary = self.channel
        share = math.ceil(settings.max_connections / settings.workers)
        self.frontend = build_frontend(
            settings, self.state, self.tunnels, ForwardingStorage(self.channel), share
        )
        self.frontend.control.add(b"GET", b"/metrics", self._metrics)
        self.services = MultiService()
        TimerService(30.0, self.state.sweep).setServiceParent(self.services)
        ClientPools(self.frontend.closers).setServiceParent(self.services)
        self.tls: ReloadableServerContext | None = None
        if any(listen.variable == "HP_EXAPPS_HTTPS_ADDRESS" for listen in listens):
            self.tls = ReloadableServerContext(settings.https_cert_path, settings.http2)
            CertificateReloader(self.tls).setServiceParent(self.services)
        self.channel_fd = channel_fd

    def start(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.services.startService()
        reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
            "before", "shutdown", self.stop
        )
        reactor.adoptStreamConnection(  # type: ignore[attr-defined]
            self.channel_fd, socket.AF_UNIX, commands.OneProtocol(self.channel)
        )
        os.close(self.channel_fd)

    def serve(self) -> None:
        """The snapshot is in: accept on the inherited listening sockets."""
        if self.stopping or self.ports:
            return
        site = self.frontend.site
        for listen in self.listens:
            factory: Any = site
            if listen.variable == "HP_EXAPPS_HTTPS_ADDRESS" and self.tls is not None:
                factory = TLSServerFactory(self.tls, site)
            port = reactor.adoptStreamPort(  # type: ignore[attr-defined]
                listen.fd, listen.family, factory
            )
            os.close(listen.fd)
            port.__class__ = SharedAcceptPort
            port.share = self.settings.workers
            self.frontend.limit.add_port(port)
            self.ports.append(port)
        log.info("worker {n} (pid {pid}) serving", n=self.index, pid=os.getpid())

    def _metrics(self, request: Request, rest: bytes) -> int:
        def send(text: bytes) -> None:
            if not responses.gone(request):
                responses.finish(
                    request, responses.send(request, 200, text, METRICS_CONTENT_TYPE)
                )

        self.channel.metrics().addCallbacks(
            send, lambda failure: _unavailable(request, failure)
        )
        return NOT_DONE_YET

    def stop(self) -> Deferred[Any]:
        self.stopping = True
        stopping: list[Deferred[Any]] = []
        for port in self.ports:
            self.frontend.limit.remove_port(port)  # type: ignore[arg-type]
            d = port.stopListening()
            if isinstance(d, Deferred):
                stopping.append(d)
        self.ports = []
        stopped = self.services.stopService()
        if isinstance(stopped, Deferred):
            stopping.append(stopped)
        return DeferredList(stopping, consumeErrors=True)

    def primary_lost(self) -> None:
        if not self.stopping:
            log.warn("worker {n}: the primary is gone; stopping", n=self.index)
            self.stopping = True
            reactor.stop()  # type: ignore[attr-defined]


def _observer(index: int, level: str, out: IO[str]) -> FilteringLogObserver:
    """twistd's classic lines on stdout, tagged with the worker, at ``HP_LOG_LEVEL``."""

    def fmt(event: LogEvent) -> str | None:
        event = dict(event)
        event.setdefault(
            "log_system",
            f"{event.get('log_namespace', '-')}#{event['log_level'].name} worker {index}",
        )
        return formatEventAsClassicLogText(event)

    levels = {"debug": LogLevel.debug, "info": LogLevel.info, "warning": LogLevel.warn,
              "error": LogLevel.error}
    return FilteringLogObserver(
        FileLogObserver(out, fmt), [logs.level_filter(), LogLevelFilterPredicate(levels[level])]
    )


def parse_args(argv: list[str]) -> tuple[int, int, list[Listen]]:
    index = int(argv[0])
    channel = -1
    listens: list[Listen] = []
    rest = argv[1:]
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--channel":
            channel = int(value)
        elif flag == "--listen":
            variable, _, where = value.partition("=")
            fd, _, family = where.partition(":")
            listens.append(Listen(variable, int(fd), int(family)))
        else:
            raise SystemExit(f"harp worker: unknown option {flag}")
    return index, channel, listens


class SharedAcceptPort(tcp.Port):
    """A listening port shared with the other workers: each takes its share of the queue.

    Twisted accepts up to ``numberAccepts`` connections each time the socket is readable
    and raises that number by 20 whenever it used them all, so after one burst (50
    connections at once) the first worker to wake took a whole later burst for itself:
    eight 100 MB downloads then ran in one worker (1.3 instead of 1.6 GB/s for the pair,
    docs/performance.md).  One connection per wake-up fixes that but leaves a burst of
    500 waiting in the queue (p99 1 s).  So a worker takes its share of what is queued:
    the kernel reports the accept queue's length for a listening socket in ``TCP_INFO``
    (``tcpi_unacked``), and the worker accepts that divided by the number of workers,
    rounded up.
    """

    #: How many workers share the socket (set by :meth:`Worker.serve`).
    share = 1

    @property  # type: ignore[override]
    def numberAccepts(self) -> int:
        return max(1, -(-accept_queue_length(self.socket) // self.share))

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        """Twisted's adaptive growth is ignored."""


#: ``struct tcp_info``: eight one-byte fields, then ``rto``, ``ato``, ``snd_mss``,
#: ``rcv_mss``, ``unacked`` (for a listening socket: connections waiting to be accepted).
_TCP_INFO_SIZE: Final = 104
_UNACKED_OFFSET: Final = 24


def accept_queue_length(sock: socket.socket) -> int:
    """Connections waiting in a listening TCP socket's accept queue (0 if unknown)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except (OSError, AttributeError):
        return 0
    if len(info) < _UNACKED_OFFSET + 4:
        return 0
    return int(struct.unpack_from("I", info, _UNACKED_OFFSET)[0])


def main(argv: list[str]) -> int:
    index, channel_fd, listens = parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"harp: configuration error: {exc.line()}\n")
        return 2
    logs.set_level(settings.log_level)
    globalLogBeginner.beginLoggingTo(
        [_observer(index, settings.log_level, sys.stdout)], redirectStandardIO=False
    )
    try:
        worker = Worker(settings, index, channel_fd, listens)
    except TLSConfigError as exc:
        log.error("worker {n}: cannot load the HTTPS certificate: {e}", n=index, e=str(exc))
        return 2
    tune(reactor)
    reactor.callWhenRunning(worker.start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return worker.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
