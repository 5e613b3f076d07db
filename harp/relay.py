"""A relay: two connected byte streams spliced together, each byte passed on untouched.

HaRP relays in two places: a WebSocket once its ExApp answered ``101``
(:mod:`harp.web.upgrade`), and a local user connection of an FRP tunnel port with a work
connection of its frpc client (:mod:`harp.frp.tunnels`).  Both are this one object.  The
idea is Twisted's ``twisted.protocols.portforward`` (pause the first side, connect the
second, register each transport as the other's producer, resume); this adds what a
proxy needs on top of it:

- **Early bytes.**  The *client* side exists first (the HTTP client, the local TCP
  client of a tunnel port).  Reading from it is paused until the *upstream* side is
  connected; bytes it already sent (e.g. what the HTTP channel had buffered) are kept
  and go out first.
- **Flow control both ways.**  Each transport is the other's streaming producer: a side
  that cannot write as fast as the other reads pauses the reader, so a slow peer never
  makes HaRP buffer without bound.
- **One idle limit.**  No byte in either direction for *idle* seconds (``None``: never)
  calls *on_idle*; every byte pushes the deadline back (``IDelayedCall.reset``, which
  costs no heap operation when the deadline only moves later).  The owner decides how
  to close and logs in its own words.
- **Either end closes both** (HAProxy's and frp's full close).  Producers are
  unregistered first: a transport still holding a paused producer would wait for it
  instead of closing.
- **An account.**  Bytes passed each way are counted (two integer additions per
  chunk) and *on_closed* is told once when the relay ends, however it ends: a
  WebSocket's access line is written then (docs/operations.md, "Logs").

The relay owns no protocol: its owner's protocols feed it (``from_client``,
``from_upstream``, ``client_lost``, ``upstream_lost``), because each side's protocol
has other work before the splice (parsing the ``101``, asking frpc for a work
connection).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from harp.timers import cancel

__all__ = ["Relay", "RelaySide"]


class RelaySide(Protocol):
    """A side of a relay: a transport that is a consumer and a push producer.

    TCP and TLS transports are; so is an FRP work connection
    (:class:`harp.frp.stream.Stream`).
    """

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


class Relay:
    """Splice *client* with an upstream given later to :meth:`connect`.

    States: open without upstream (client paused, its bytes kept) → spliced → closed.
    Once closed, data and ends are ignored, so either side's ``connectionLost`` may
    arrive in any order.
    """

    def __init__(
        self,
        client: RelaySide,
        clock: IReactorTime,
        idle: float | None,
        on_idle: Callable[[], None],
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.upstream: RelaySide | None = None
        self.clock = clock
        self.idle = idle
        self.on_idle = on_idle
        self.on_closed = on_closed
        self.closed = False
        #: Bytes passed on from the client to the upstream, and back.
        self.bytes_up = 0
        self.bytes_down = 0
        self._early: list[bytes] = []
        self._timer: IDelayedCall | None = None
        client.pauseProducing()  # nowhere to send the client's bytes yet

    def connect(self, upstream: RelaySide) -> None:
        """Start relaying to *upstream*; if the client is already gone, close it instead."""
        if self.closed:
            upstream.loseConnection()
            return
        self.upstream = upstream
        upstream.registerProducer(self.client, True)
        self.client.registerProducer(upstream, True)
        early, self._early = self._early, []
        for data in early:
            self.bytes_up += len(data)
            upstream.write(data)
        if self.idle is not None:
            self._timer = self.clock.callLater(self.idle, self._idle)
        self.client.resumeProducing()

    # --- data

    def from_client(self, data: bytes) -> None:
        if self.closed:
            return
        if self.upstream is None:
            self._early.append(data)
            return
        self._touch()
        self.bytes_up += len(data)
        self.upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        if self.closed:
            return
        self._touch()
        self.bytes_down += len(data)
        self.client.write(data)

    # --- ends

    def client_lost(self) -> None:
        """The client's connection ended: close the upstream side."""
        if self._end() and self.upstream is not None:
            _shut(self.upstream)

    def upstream_lost(self) -> None:
        """The upstream connection ended: close the client side."""
        if self._end():
            _shut(self.client)

    def close(self) -> None:
        """Close both sides, letting written bytes go out first."""
        if self._end():
            _shut(self.client)
            if self.upstream is not None:
                _shut(self.upstream)

    def abort(self) -> None:
        """Drop both sides at once (nothing pending is worth waiting for)."""
        if self._end():
            self.client.abortConnection()
            if self.upstream is not None:
                self.upstream.abortConnection()

    # --- internals

    def _end(self) -> bool:
        """Mark closed; False if it already was."""
        if self.closed:
            return False
        self.closed = True
        self._early.clear()
        cancel(self._timer)
        self._timer = None
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            on_closed()
        return True

    def _touch(self) -> None:
        if self._timer is not None and self.idle is not None:
            self._timer.reset(self.idle)

    def _idle(self) -> None:
        self._timer = None
        if not self.closed:
            self.on_idle()


def _shut(stream: RelaySide) -> None:
    stream.unregisterProducer()
    stream.loseConnection()
