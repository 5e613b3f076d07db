"""One logged-in frpc client: its control stream, proxies and work connections.

Named after frps's ``server/control.go``.  The :class:`Control` is created by
:meth:`harp.frp.service.FrpServer.login` and from then on owns the control stream:
plaintext ``LoginResp``, AES-128-CFB both ways, ``pool_count`` x ``ReqWorkConn``,
``NewProxy``/``CloseProxy``, ``Ping``/``Pong``.  Error texts sent to frpc are frps's own
(docs/compatibility.md#frp-login, docs/compatibility.md#frp-proxies), so frpc logs
what operators know.

When a control ends (its stream closed, a heartbeat missed, the same run_id logged in
again, or the service stopping) everything of that client goes: its proxies' ports,
parked and active work connections, and the yamux session they share.  A re-login with
the same run_id waits until the old proxies' ports are released, so frpc's immediate
re-registration does not fail with ``port already used`` (docs/compatibility.md#frp-proxies).

A control knows its service only through :class:`ControlOwner`, so this module does not
import :mod:`harp.frp.service` (which creates controls): the arrows point one way.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final, Protocol

from twisted.internet.defer import Deferred, TimeoutError, gatherResults, succeed
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from harp import timers
from harp.frp import codec, msg
from harp.frp.crypto import StreamDecryptor, StreamEncryptor
from harp.frp.stream import Stream
from harp.frp.tunnels import ProxyError, TunnelHandle, TunnelRegistry
from harp.logs import HarpLogger

__all__ = [
    "MAX_POOL_COUNT",
    "MAX_PORTS_PER_CLIENT",
    "SERVER_VERSION",
    "Control",
    "ControlOwner",
    "describe",
]

log = HarpLogger("harp.frp")

SERVER_VERSION: Final = "0.65.0"
"""Reported in LoginResp; frpc only logs it."""
MAX_POOL_COUNT: Final = 5
"""frps ``transport.maxPoolCount``."""
POOL_SLACK: Final = 10
"""frps parks at most pool_count + 10 idle work connections."""
MAX_PORTS_PER_CLIENT: Final = 1
"""Reference HaRP ``maxPortsPerClient``."""

_KNOWN_PROXY_TYPES: Final = frozenset(
    {"tcp", "udp", "http", "https", "stcp", "sudp", "xtcp", "tcpmux"}
)
_ERR_COMPRESSION: Final = (
    "compression (transport.useCompression) is not supported by this server; disable it"
)


class ControlOwner(Protocol):
    """What a control needs from its service (:class:`harp.frp.service.FrpServer`)."""

    reactor: Any
    registry: TunnelRegistry
    cipher_key: bytes
    heartbeat_timeout: float
    work_conn_timeout: float

    def forget(self, control: Control) -> None:
        """*control* ended: drop it from the run_id table (if it is still the one there)."""
        ...


def describe(value: str, limit: int = 64) -> str:
    """A client-supplied string made safe and short for a log line."""
    text = value.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


class _Parked(TwistedProtocol):
    """A work connection waiting in its control's pool for ``StartWorkConn``."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def dataReceived(self, data: bytes) -> None:
        # frpc sends nothing before StartWorkConn; a client that does is broken.
        assert isinstance(self.transport, Stream)
        log.debug("FRP run_id {run_id}: data on an idle work connection, closing it",
                  run_id=self.control.run_id)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        assert isinstance(self.transport, Stream)
        self.control.unpark(self.transport)


class Control(TwistedProtocol):
    """One logged-in frpc client; the protocol of its control stream."""

    def __init__(
        self,
        server: ControlOwner,
        stream: Stream,
        login: msg.Login,
        run_id: str,
        decoder: codec.MessageDecoder,
        addr: str,
    ) -> None:
        self.server = server
        self.stream = stream
        self.login = login
        self.run_id = run_id
        self.addr = addr
        self.decoder = decoder
        self.pool_count = min(max(login.pool_count, 0), MAX_POOL_COUNT)
        self.started = False
        self.closed = False
        self.proxies: dict[str, TunnelHandle] = {}
        self._registering: set[str] = set()
        self._encryption: dict[str, bool] = {}
        self._pool: deque[Stream] = deque()
        self._waiters: deque[Deferred[Stream]] = deque()
        self._active: set[Stream] = set()
        self._encryptor: StreamEncryptor | None = None
        self._heartbeat: IDelayedCall | None = None
        self._released: Deferred[None] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Reply LoginResp, switch to AES-CFB, fill the pool, process buffered input."""
        if self.closed:
            return
        self.started = True
        stream = self.stream
        stream.write(codec.encode_message(msg.LoginResp(version=SERVER_VERSION,
                                                       run_id=self.run_id)))
        key = self.server.cipher_key
        self._encryptor = StreamEncryptor(key)
        self.decoder.set_transform(StreamDecryptor(key).decrypt)
        if stream.multiplexed:
            stream.mark_logged_in()  # the yamux session's login deadline is met
        else:  # no yamux keepalive: frps's app-level heartbeat timeout applies
            self._heartbeat = self.server.reactor.callLater(
                self.server.heartbeat_timeout, self._heartbeat_expired
            )
        login = self.login
        log.info(
            "FRP client {run_id} logged in from {addr} (frpc {version} {os}/{arch}, {mux}, "
            "pool {pool})",
            run_id=self.run_id, addr=self.addr, version=describe(login.version),
            os=describe(login.os), arch=describe(login.arch),
            mux="tcpMux" if stream.multiplexed else "no tcpMux", pool=self.pool_count,
        )
        for _ in range(self.pool_count):
            self._send(msg.ReqWorkConn())
        self._process()

    def shutdown(self, why: str) -> Deferred[None]:
        """End this client's session; fires once its ports are free again."""
        if self._released is not None:
            return _chain(self._released)
        self.closed = True
        self.server.forget(self)
        timers.cancel(self._heartbeat)
        self._heartbeat = None
        failure = Failure(ConnectError(string=f"FRP client {self.run_id} disconnected"))
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                waiter.errback(failure)
        for stream in [*self._pool, *self._active]:
            stream.abortConnection()
        self._pool.clear()
        self._active.clear()
        names = sorted(self.proxies)
        released = [handle.close() for handle in self.proxies.values()]
        self.proxies.clear()
        self.stream.close_carrier()
        if self.started:
            log.info("FRP client {run_id} from {addr} logged out ({why}){proxies}",
                     run_id=self.run_id, addr=self.addr, why=why,
                     proxies=f"; closed proxies {', '.join(names)}" if names else "")
        self._released = gatherResults(released, consumeErrors=True).addCallback(
            lambda _: None
        )
        return _chain(self._released)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.shutdown("control connection closed")

    def _heartbeat_expired(self) -> None:
        self._heartbeat = None
        if not self.closed:
            self.shutdown(f"no heartbeat for {self.server.heartbeat_timeout:.0f}s")

    # ------------------------------------------------------------ messages

    def _send(self, message: msg.Message) -> None:
        if self.closed or self._encryptor is None:
            return
        self.stream.write(self._encryptor.encrypt(codec.encode_message(message)))

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.decoder.feed(data)
        if self.started:
            self._process()

    def _process(self) -> None:
        while not self.closed:
            try:
                message = self.decoder.next_message()
            except codec.ProtocolError as exc:
                log.info("FRP client {run_id}: bad control message, closing: {error}",
                         run_id=self.run_id, error=str(exc))
                self.shutdown("protocol error")
                return
            if message is None:
                return
            self._handle(message)

    def _handle(self, message: msg.Message) -> None:
        if isinstance(message, msg.NewProxy):
            self._new_proxy(message)
        elif isinstance(message, msg.CloseProxy):
            self._close_proxy(message.proxy_name)
        elif isinstance(message, msg.Ping):
            if self._heartbeat is not None and self._heartbeat.active():
                self._heartbeat.reset(self.server.heartbeat_timeout)
            self._send(msg.Pong())
        else:  # NatHole*, UDPPacket, or a message that belongs elsewhere: frps ignores them
            log.debug("FRP client {run_id}: ignored {kind}", run_id=self.run_id,
                      kind=type(message).__name__)

    # ------------------------------------------------------------ proxies

    def _proxy_error(self, message: msg.NewProxy) -> str | None:
        kind = message.proxy_type or "tcp"
        if kind not in _KNOWN_PROXY_TYPES:
            return f"unknown proxy type: {kind}"
        if kind != "tcp":
            return f"proxy type [{kind}] is not supported by this server, only tcp"
        if message.use_compression:
            return _ERR_COMPRESSION
        if len(self.proxies) + len(self._registering) + 1 > MAX_PORTS_PER_CLIENT:
            return "exceed the max_ports_per_client"
        return None

    def _new_proxy(self, message: msg.NewProxy) -> None:
        name = message.proxy_name
        error = self._proxy_error(message)
        if error is None and name in self._registering:
            error = f"proxy [{name}] already exists"
        if error is not None:
            self._proxy_refused(name, message.remote_port, error)
            return
        self._registering.add(name)
        d = self.server.registry.register(name, message.remote_port, self)

        def registered(handle: TunnelHandle) -> None:
            self._registering.discard(name)
            if self.closed:
                handle.close()
                return
            self.proxies[name] = handle
            self._encryption[name] = message.use_encryption
            log.info("FRP proxy [{name}] of client {run_id} listening on {host}:{port}{enc}",
                     name=describe(name), run_id=self.run_id,
                     host=self.server.registry.bind_host, port=handle.port,
                     enc=" (encrypted)" if message.use_encryption else "")
            self._send(msg.NewProxyResp(proxy_name=name, remote_addr=f":{handle.port}"))

        def refused(failure: Failure) -> None:
            self._registering.discard(name)
            failure.trap(ProxyError)
            self._proxy_refused(name, message.remote_port, str(failure.value))

        d.addCallbacks(registered, refused)
        d.addErrback(lambda f: log.failure("FRP proxy registration failed", f))

    def _proxy_refused(self, name: str, port: int, error: str) -> None:
        log.info("FRP proxy [{name}] (port {port}) of client {run_id} refused: {error}",
                 name=describe(name), port=port, run_id=self.run_id, error=error)
        self._send(msg.NewProxyResp(proxy_name=name, error=error))

    def _close_proxy(self, name: str) -> None:
        handle = self.proxies.pop(name, None)
        self._encryption.pop(name, None)
        if handle is None:
            return
        handle.close()
        log.info("FRP proxy [{name}] of client {run_id} closed (port {port})",
                 name=describe(name), run_id=self.run_id, port=handle.port)

    # ------------------------------------------------------------ work connections

    def add_work_conn(self, stream: Stream) -> None:
        """A NewWorkConn arrived for us: serve a waiter, or park it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                waiter.callback(stream)
                return
        if len(self._pool) >= self.pool_count + POOL_SLACK:
            log.debug("FRP client {run_id}: work connection pool is full", run_id=self.run_id)
            stream.loseConnection()
            return
        self._pool.append(stream)
        stream.attach(_Parked(self))

    def unpark(self, stream: Stream) -> None:
        try:
            self._pool.remove(stream)
        except ValueError:
            pass

    def _take_work_conn(self) -> Deferred[Stream]:
        while self._pool:
            stream = self._pool.popleft()
            if stream.alive:
                self._send(msg.ReqWorkConn())  # refill, as frps does
                return succeed(stream)

        def cancel(d: Deferred[Stream]) -> None:
            try:
                self._waiters.remove(d)
            except ValueError:
                pass

        waiter: Deferred[Stream] = Deferred(cancel)
        self._waiters.append(waiter)
        self._send(msg.ReqWorkConn())

        def failed(failure: Failure) -> Failure:
            if failure.check(TimeoutError):
                return Failure(ConnectError(
                    string=f"no FRP work connection from client {self.run_id} within "
                           f"{self.server.work_conn_timeout:.0f}s"))
            return failure

        def got(stream: Stream) -> Stream:
            self._send(msg.ReqWorkConn())  # refill, as frps does
            return stream

        waiter.addTimeout(self.server.work_conn_timeout, self.server.reactor)
        waiter.addCallbacks(got, failed)
        return waiter

    def open_work_conn(
        self, proxy_name: str, src: tuple[str, int], dst: tuple[str, int]
    ) -> Deferred[Stream]:
        """``WorkConnSource``: a work connection with StartWorkConn sent (see tunnels)."""
        if self.closed or proxy_name not in self.proxies:
            d: Deferred[Stream] = Deferred()
            d.errback(ConnectError(string=f"FRP proxy [{proxy_name}] is gone"))
            return d
        encrypted = self._encryption.get(proxy_name, False)

        def start(stream: Stream) -> Stream:
            if self.closed or not stream.alive:
                stream.abortConnection()
                raise ConnectError(string=f"FRP client {self.run_id} disconnected")
            stream.write(codec.encode_message(msg.StartWorkConn(
                proxy_name=proxy_name, src_addr=src[0], src_port=src[1] & 0xFFFF,
                dst_addr=dst[0], dst_port=dst[1] & 0xFFFF)))
            if encrypted:
                key = self.server.cipher_key
                stream.set_cipher(StreamEncryptor(key), StreamDecryptor(key))
            self._active.add(stream)
            stream.notify_lost(self._active.discard)
            return stream

        return self._take_work_conn().addCallback(start)


def _chain(d: Deferred[None]) -> Deferred[None]:
    """A fresh Deferred that fires with None when *d* does (without consuming its result)."""
    out: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out
