"""Upgraded connections (WebSockets): after the route check, a raw byte tunnel.

The request head is re-sent to the ExApp on a dedicated upstream connection (not the
keep-alive pool: it will never come back) with the identity headers set; from then
on bytes flow both ways untouched, the upstream's ``101 Switching Protocols`` (or its
refusal) included.  Each direction is flow-controlled by registering the other
side's transport as its producer, so a slow reader pauses the fast writer instead of
growing a buffer.  Idle for ``HP_TIMEOUT_TUNNEL`` (default: the server timeout; 0 =
never) → both ends are closed.  This is the reference bug #114 done right: an idle
WebSocket is not cut at the client timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from harp.logs import HarpLogger
from harp.web.site import HarpChannel

log = HarpLogger("harp.tunnel")


class _Upstream(Protocol):
    def __init__(self, tunnel: UpgradeTunnel) -> None:
        self.tunnel = tunnel

    def connectionMade(self) -> None:
        self.tunnel.upstream_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.upstream_data(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.tunnel.upstream_lost()


class UpgradeTunnel:
    def __init__(
        self,
        channel: HarpChannel,
        head: bytes,
        idle: float | None,
        clock: IReactorTime,
        on_failure: Callable[[Failure], None],
    ) -> None:
        self.channel = channel
        self.head = head
        self.idle = idle
        self.clock = clock
        self.on_failure = on_failure
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []
        self.closed = False
        self.timer: IDelayedCall | None = None

    def start(self, endpoint: IStreamClientEndpoint) -> None:
        connecting = endpoint.connect(Factory.forProtocol(lambda: _Upstream(self)))
        connecting.addErrback(self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        if not self.closed:
            self.closed = True
            self.on_failure(failure)

    @property
    def client(self) -> Any:
        """The client's transport (TCP or TLS: both are consumers and producers)."""
        return self.channel.transport

    # --- upstream side

    def upstream_connected(self, upstream: _Upstream) -> None:
        if self.closed:
            assert upstream.transport is not None
            upstream.transport.loseConnection()
            return
        self.upstream = upstream
        up: Any = upstream.transport
        up.write(self.head)
        # From here on the client connection is ours, not HTTP's.
        self.channel.become_tunnel(self)
        client = self.client
        client.unregisterProducer()
        client.registerProducer(cast(IPushProducer, up), True)
        up.registerProducer(cast(IPushProducer, client), True)
        client.resumeProducing()  # the channel may have paused reading
        for data in self.pending:
            up.write(data)
        self.pending.clear()
        self._touch()

    def upstream_data(self, data: bytes) -> None:
        self._touch()
        self.client.write(data)

    def upstream_lost(self) -> None:
        self._close()

    # --- client side (called by the channel)

    def client_data(self, data: bytes) -> None:
        self._touch()
        if self.upstream is None or self.upstream.transport is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def client_lost(self) -> None:
        self._close()

    # --- idle limit

    def _touch(self) -> None:
        if self.idle is None or self.closed:
            return
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.idle)
        else:
            self.timer = self.clock.callLater(self.idle, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self.timer = None
        log.info("tunnel idle for {idle}s: closing", idle=self.idle)
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()
        if self.channel.transport is not None:
            self.channel.transport.loseConnection()
