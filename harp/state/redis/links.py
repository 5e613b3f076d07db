"""Connections to Redis: one :class:`Link` per connection, re-made with backoff until stopped.

A replica holds two (commands and pub/sub).  A link only connects, logs in (through
txredisapi) and reports to its :class:`LinkOwner`; what the connections are used for is the
replica's concern (:mod:`harp.state.redis.replica`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Final, Protocol

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure

from harp import timers
from harp.config import RedisURL

#: Reconnection backoff: first delay, growth factor, cap (seconds), +-20 % jitter.
RECONNECT_INITIAL: Final = 0.5
RECONNECT_FACTOR: Final = 2.0
RECONNECT_MAX: Final = 5.0
CONNECT_TIMEOUT: Final = 5.0
#: A command not answered within this is a dead connection: it is aborted and re-made.
REPLY_TIMEOUT: Final = 5.0


class LinkOwner(Protocol):
    """What a :class:`Link` reports to (the replica): its connection's life and messages."""

    def connection_problem(self, link: str, why: str) -> None:
        """Connecting failed or the connection was lost (``why`` has no secrets)."""
        ...

    def login_failed(self, why: str) -> None:
        """AUTH or SELECT refused; ``why`` is the server's answer."""
        ...

    def link_ready(self, link: Link) -> None:
        """Connected, logged in and the database selected."""
        ...

    def link_lost(self, link: Link) -> None:
        """A ready connection went away; the link reconnects by itself."""
        ...

    def on_message(self, raw: str | bytes) -> None:
        """A message on a subscribed channel (pub/sub link only)."""
        ...


def backoff_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before reconnection attempt ``attempt`` (0-based): capped exponential growth,
    +-20 % jitter so that N replicas do not stampede a Redis that just came back."""
    base = min(RECONNECT_INITIAL * RECONNECT_FACTOR ** min(attempt, 32), RECONNECT_MAX)
    return float(base * (0.8 + 0.4 * rand()))


class _ProtocolOwner:
    """What txredisapi's protocol expects of ``self.factory``.

    On a failed AUTH or SELECT it calls ``stopTrying()`` and ``connectionError(msg)`` and
    drops the connection.  We do not give up (Redis may be restarting with a new ACL); the
    link retries with backoff and the message (the server's answer, never the password) is
    logged once.
    """

    isLazy = False

    def __init__(self, link: Link) -> None:
        self.link = link

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        self.link.owner.login_failed(why)


class CommandProtocol(txredisapi.RedisProtocol):  # type: ignore[misc]
    link: Link | None = None

    def connectionMade(self) -> Any:
        _keepalive(self)
        return super().connectionMade()

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        if self.link is not None:
            self.link.lost(self)


class SubscriberProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    link: Link | None = None

    def connectionMade(self) -> Any:
        _keepalive(self)
        return super().connectionMade()

    def messageReceived(self, pattern: object, channel: object, message: object) -> None:
        if self.link is not None and isinstance(message, str | bytes):
            self.link.owner.on_message(message)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        if self.link is not None:
            self.link.lost(self)


def _keepalive(protocol: Any) -> None:
    """TCP keepalive: a Redis host that vanished is noticed even on an idle connection."""
    setter = getattr(protocol.transport, "setTcpKeepAlive", None)
    if setter is not None:
        try:
            setter(1)
        except OSError:
            pass


class Link:
    """One Redis connection, re-made with backoff until :meth:`stop`.

    Hand-rolled rather than ``ClientService`` because "connected" here means "AUTH and
    SELECT done", which may fail after TCP succeeded; such a connection must count as a
    failed attempt for the backoff, not reset it.
    """

    def __init__(
        self,
        owner: LinkOwner,
        name: str,
        reactor: IReactorTime,
        url: RedisURL,
        protocol_class: type[Any],
    ) -> None:
        self.owner = owner
        self.name = name
        self.reactor = reactor
        self.endpoint = endpoint_for(reactor, url)
        self.protocol_class = protocol_class
        self.url = url
        self.protocol: Any = None  # ready (logged in, database selected) or None
        self._connecting: defer.Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._attempt = 0
        self._stopped = True
        self._current: Any = None  # the protocol of the live TCP connection, ready or not

    def start(self) -> None:
        self._stopped = False
        self._connect()

    def build(self) -> Any:
        """A protocol for a new TCP connection (for :class:`_LinkFactory`); it logs in with
        the URL's credentials and reports back through :meth:`_ready` and :meth:`lost`."""
        protocol = self.protocol_class(
            charset="utf-8", replyTimeout=REPLY_TIMEOUT, password=self.url.password,
            dbid=self.url.db, convertNumbers=False, username=self.url.username,
        )
        protocol.factory = _ProtocolOwner(self)
        protocol.link = self
        protocol.whenConnected().addCallback(self._ready)
        self._current = protocol
        return protocol

    def _connect(self) -> None:
        self._retry = None
        if self._stopped:
            return
        connecting = self.endpoint.connect(_LinkFactory(self))
        self._connecting = connecting
        connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, protocol: Any) -> None:
        self._connecting = None

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._stopped:
            return
        self.owner.connection_problem(self.name, failure.getErrorMessage())
        self._schedule()

    def _ready(self, protocol: Any) -> None:
        if self._stopped or protocol is not self._current:
            return
        self._attempt = 0
        self.protocol = protocol
        self.owner.link_ready(self)

    def lost(self, protocol: Any) -> None:
        if protocol is not self._current:
            return
        self._current = None
        was_ready = self.protocol is not None
        self.protocol = None
        if was_ready:
            self.owner.link_lost(self)
        if not self._stopped:
            self._schedule()

    def _schedule(self) -> None:
        delay = backoff_delay(self._attempt)
        self._attempt += 1
        self._retry = self.reactor.callLater(delay, self._connect)

    def stop(self) -> defer.Deferred[None]:
        self._stopped = True
        timers.cancel(self._retry)
        self._retry = None
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.addErrback(lambda _: None)
            connecting.cancel()
        current, self._current, self.protocol = self._current, None, None
        if current is None or current.transport is None:
            return defer.succeed(None)
        gone: defer.Deferred[None] = current.whenDisconnected()
        gone.addCallback(lambda _: None)
        current.transport.loseConnection()
        return gone


class _LinkFactory(Factory):
    noisy = False  # one "Starting factory" line per reconnection attempt helps nobody

    def __init__(self, link: Link) -> None:
        self.link = link

    def buildProtocol(self, addr: object) -> Any:
        return self.link.build()


def redis_call(protocol: Any, method: str, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """Call a txredisapi command as a Deferred: it raises synchronously when the
    connection has just gone, which must not reach the request that caused the write."""
    return defer.maybeDeferred(getattr(protocol, method), *args, **kwargs)


def endpoint_for(reactor: Any, url: RedisURL) -> IStreamClientEndpoint:
    """Where to connect: the UNIX socket, or host and port, wrapped in TLS for ``rediss``."""
    if url.path is not None:
        return UNIXClientEndpoint(reactor, url.path, timeout=CONNECT_TIMEOUT)
    assert url.host is not None
    endpoint: IStreamClientEndpoint = HostnameEndpoint(
        reactor, url.host, url.port, timeout=CONNECT_TIMEOUT
    )
    if url.tls:
        endpoint = wrapClientTLS(optionsForClientTLS(url.host), endpoint)
    return endpoint
