"""TunnelRegistry: the one place where the FRP server and the HTTP side meet.

For every ``tcp`` proxy an frpc client registers, the registry

* reserves the proxy's **name** (unique across all clients) and **port** (23000-23999 and
  24000-24099, as the reference's ``allowPorts``);
* binds ``127.0.0.1:port`` -- never another interface -- and relays each accepted TCP
  connection to a fresh work connection of that client (:class:`harp.relay.Relay`:
  back-pressure both ways, an idle limit);
* offers :meth:`TunnelRegistry.endpoint_for`, an ``IStreamClientEndpoint`` that the
  HTTP proxy's connection pool uses to reach ``127.0.0.1:port`` *through the tunnel
  directly*, without a loopback hop (docs/differences.md#2).

The registry knows nothing about controls, yamux or messages: a proxy is registered with
a :class:`WorkConnSource` (the client's control), which hands out ready work
connections as :class:`~harp.frp.stream.Stream` transports.

Port release is asynchronous in Twisted (the socket closes on the next reactor turn), and
frpc re-registers its proxies right after a reconnect.  So :meth:`TunnelHandle.close`
returns a Deferred, and a registration of a port whose previous listener is still
closing waits for it instead of failing with "port unavailable".
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import CannotListenError, ConnectError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorTCP,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from harp.frp.stream import Stream
from harp.logs import HarpLogger
from harp.relay import Relay

__all__ = [
    "ALLOWED_PORT_RANGES",
    "ProxyError",
    "TunnelEndpoint",
    "TunnelHandle",
    "TunnelRegistry",
    "WorkConnSource",
]

log = HarpLogger("harp.frp")

ALLOWED_PORT_RANGES: Final = ((23000, 23999), (24000, 24099))
"""The reference frps ``allowPorts``: ExApps, then Docker engines."""

BIND_HOST: Final = "127.0.0.1"


class ProxyError(Exception):
    """A proxy cannot be registered; ``str()`` is the frps error text sent to frpc."""


class WorkConnSource(Protocol):
    """What a registered proxy needs from its client (implemented by the control)."""

    def open_work_conn(
        self, proxy_name: str, src: tuple[str, int], dst: tuple[str, int]
    ) -> Deferred[Stream]:
        """A work connection with ``StartWorkConn`` already sent, ready for raw bytes.

        Fails with ``ConnectError`` when none arrives in time or the client is gone;
        cancelling the Deferred withdraws the request.
        """
        ...


@dataclass(eq=False)
class TunnelHandle:
    """One live proxy: its name, port, listener and the client that serves it."""

    registry: TunnelRegistry
    name: str
    port: int
    source: WorkConnSource
    listener: IListeningPort | None = None
    closed: bool = False

    def close(self) -> Deferred[None]:
        """Unregister and stop listening; fires once the port can be bound again."""
        return self.registry._close(self)


class TunnelRegistry:
    """Port → live proxy map, port listeners and in-process endpoints.

    *idle_timeout* bounds how long a relayed user connection may sit with no byte in
    either direction (frpc leaves a work stream open when its local unix socket is
    missing, so without it such a user connection would hang).  ``None`` disables it.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        idle_timeout: float | None = 1800.0,
        port_ranges: Iterable[tuple[int, int]] = ALLOWED_PORT_RANGES,
        bind_host: str = BIND_HOST,
    ) -> None:
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.port_ranges = tuple(port_ranges)
        self.bind_host = bind_host
        self._by_name: dict[str, TunnelHandle] = {}
        self._by_port: dict[int, TunnelHandle] = {}
        self._closing: dict[int, Deferred[None]] = {}
        #: Called whenever :meth:`ports` may have changed (HaRP's workers mirror it).
        self.on_change: Callable[[], object] | None = None

    # ---------------------------------------------------------------- queries

    def port_allowed(self, port: int) -> bool:
        return any(low <= port <= high for low, high in self.port_ranges)

    def live(self, port: int) -> TunnelHandle | None:
        """The proxy serving *port*, if it is bound and its client is connected."""
        handle = self._by_port.get(port)
        if handle is None or handle.listener is None or handle.closed:
            return None
        return handle

    def ports(self) -> list[int]:
        """Ports with a live proxy (sorted)."""
        return sorted(port for port in self._by_port if self.live(port) is not None)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def endpoint_for(self, port: int) -> IStreamClientEndpoint | None:
        """An endpoint reaching 127.0.0.1:*port* through its tunnel, or None if none is live.

        Used by :class:`harp.web.upstream.UpstreamEndpoints` (the ``TunnelLookup`` seam).
        """
        handle = self.live(port)
        return None if handle is None else TunnelEndpoint(handle)

    # ---------------------------------------------------------------- registration

    def register(self, name: str, port: int, source: WorkConnSource) -> Deferred[TunnelHandle]:
        """Reserve *name* and *port* and bind the listener.

        Checks in frps's order; failures are :class:`ProxyError` with frps's text:
        ``proxy [name] already exists``, ``port not allowed``, ``port already used``,
        ``port unavailable``.  *port* 0 picks a free allowed port.
        """
        if name in self._by_name:
            return _fail(ProxyError(f"proxy [{name}] already exists"))
        if port == 0:
            try:
                port = self._pick_port()
            except ProxyError as exc:
                return _fail(exc)
        elif not self.port_allowed(port):
            return _fail(ProxyError("port not allowed"))
        elif port in self._by_port:
            return _fail(ProxyError("port already used"))
        handle = TunnelHandle(self, name, port, source)
        self._by_name[name] = handle
        self._by_port[port] = handle
        pending = self._closing.get(port)
        d: Deferred[None] = Deferred() if pending is not None else succeed(None)
        if pending is not None:
            pending.addBoth(lambda _: d.callback(None))
        return d.addCallback(lambda _: self._bind(handle))

    def _pick_port(self) -> int:
        candidates = [
            port
            for low, high in self.port_ranges
            for port in range(low, high + 1)
            if port not in self._by_port and port not in self._closing
        ]
        if not candidates:
            raise ProxyError("no available port")
        return random.choice(candidates)  # noqa: S311 - not security relevant

    def _bind(self, handle: TunnelHandle) -> TunnelHandle:
        if handle.closed:
            raise ProxyError("proxy closed while binding")
        factory = _UserConnFactory(handle)
        try:
            tcp: IReactorTCP = self.reactor
            handle.listener = tcp.listenTCP(
                handle.port, factory, interface=self.bind_host  # type: ignore[arg-type]
            )
        except CannotListenError as exc:
            self._unregister(handle)
            handle.closed = True
            log.info("FRP proxy [{name}]: cannot bind {host}:{port}: {error}",
                     name=handle.name, host=self.bind_host, port=handle.port,
                     error=str(exc.socketError))
            raise ProxyError("port unavailable") from None
        self._changed()
        return handle

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _unregister(self, handle: TunnelHandle) -> None:
        if self._by_name.get(handle.name) is handle:
            del self._by_name[handle.name]
        if self._by_port.get(handle.port) is handle:
            del self._by_port[handle.port]
            self._changed()

    def _close(self, handle: TunnelHandle) -> Deferred[None]:
        if handle.closed:
            return self._closing.get(handle.port) or succeed(None)
        handle.closed = True
        self._unregister(handle)
        listener, handle.listener = handle.listener, None
        if listener is None:
            return succeed(None)
        stopped = listener.stopListening()
        if not isinstance(stopped, Deferred):
            return succeed(None)
        port = handle.port
        done: Deferred[None] = Deferred()
        self._closing[port] = done

        def finished(_: object) -> None:
            if self._closing.get(port) is done:
                del self._closing[port]
            done.callback(None)

        stopped.addBoth(finished)
        # Hand out a separate Deferred so callers' callbacks cannot alter ours.
        result: Deferred[None] = Deferred()
        done.addBoth(lambda _: result.callback(None))
        return result

    def close_all(self) -> Deferred[None]:
        """Stop every listener (service shutdown)."""
        handles = list(self._by_name.values())
        d = gatherResults([h.close() for h in handles], consumeErrors=True)
        return d.addCallback(lambda _: None)


def _fail(exc: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(exc))
    return d


# ---------------------------------------------------------------------------------------
# In-process endpoint


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connect = take a work connection of the proxy's client and run the protocol on it.

    The transport handed to the protocol is the work connection itself (a
    :class:`~harp.frp.stream.Stream`), so ``twisted.web.client`` pools and reuses it
    like a TCP connection.  Failures are ``ConnectError`` (the proxy answers 503).
    """

    def __init__(self, handle: TunnelHandle) -> None:
        self.handle = handle

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        handle = self.handle
        if handle.closed:
            return _fail(ConnectError(string=f"FRP tunnel on port {handle.port} is gone"))
        addr = IPv4Address("TCP", BIND_HOST, handle.port)
        d = handle.source.open_work_conn(handle.name, (BIND_HOST, 0), (BIND_HOST, handle.port))

        def attach(stream: Stream) -> IProtocol:
            protocol = protocolFactory.buildProtocol(addr)
            if protocol is None:
                stream.loseConnection()
                raise ConnectError(string="protocol factory refused the connection")
            stream.attach(protocol)
            return protocol

        return d.addCallback(attach)


# ---------------------------------------------------------------------------------------
# User connections on 127.0.0.1:port


class _UserConnFactory(ServerFactory):
    noisy = False

    def __init__(self, handle: TunnelHandle) -> None:
        self.handle = handle

    def buildProtocol(self, addr: IAddress | None) -> _UserConn:
        return _UserConn(self.handle)


class _UserConn(TwistedProtocol):
    """A local TCP client of a tunnel port, relayed to one work connection.

    The :class:`~harp.relay.Relay` holds the user's bytes until frpc's work connection
    arrives and then splices the two; this protocol only asks for the work connection.
    """

    def __init__(self, handle: TunnelHandle) -> None:
        self.handle = handle
        self.relay: Relay | None = None
        self._pending: Deferred[Stream] | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        registry = self.handle.registry
        self.relay = Relay(transport, registry.reactor, registry.idle_timeout, self._idle)
        peer, host = transport.getPeer(), transport.getHost()
        src = (getattr(peer, "host", ""), getattr(peer, "port", 0))
        dst = (getattr(host, "host", ""), getattr(host, "port", 0))
        self._pending = self.handle.source.open_work_conn(self.handle.name, src, dst)
        self._pending.addCallbacks(self._got_stream, self._no_stream)

    def _got_stream(self, stream: Stream) -> None:
        self._pending = None
        relay = self.relay
        assert relay is not None
        if relay.closed:  # the user left while frpc was asked
            stream.loseConnection()
            return
        stream.attach(_WorkConnSide(relay))
        if stream.alive:
            relay.connect(stream)

    def _no_stream(self, failure: Failure) -> None:
        self._pending = None
        relay = self.relay
        assert relay is not None
        if relay.closed:
            return
        log.info("FRP proxy [{name}]: no work connection for a user connection: {error}",
                 name=self.handle.name, error=failure.getErrorMessage())
        relay.close()

    def _idle(self) -> None:
        # frpc leaves a work stream open when its local service is missing: abort, a
        # graceful close would wait for that stream forever.
        log.info("FRP proxy [{name}]: closing a user connection idle for {secs:.0f}s",
                 name=self.handle.name, secs=self.handle.registry.idle_timeout)
        assert self.relay is not None
        self.relay.abort()

    def dataReceived(self, data: bytes) -> None:
        assert self.relay is not None
        self.relay.from_client(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.addErrback(lambda _: None)
            pending.cancel()
        if self.relay is not None:
            self.relay.client_lost()


class _WorkConnSide(TwistedProtocol):
    """The work connection's protocol while it relays for a :class:`_UserConn`."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def dataReceived(self, data: bytes) -> None:
        self.relay.from_upstream(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The work connection ended: close the user side too (frp's full close)."""
        self.relay.upstream_lost()
