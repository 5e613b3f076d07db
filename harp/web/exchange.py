"""A lean HTTP/1.1 client for one job: forward a request head, splice the bodies.

``twisted.web.client.Agent`` is general: it rebuilds a ``Headers`` object, re-encodes
every header, runs a Deferred chain per request and per response, and wraps the body
in a protocol chain.  Profiling the public route showed it at half of HaRP's CPU
(docs/performance.md).  A reverse proxy needs far less: the request head is written
as one buffer, the response head is parsed by the pure
:func:`harp.web.response_head.parse_response_head`, and the body bytes are handed on
as they arrive, framed by Content-Length, chunked coding or the connection's close.

Connections are kept per upstream (host, port) in :class:`ConnectionPool` and reused
the way HAProxy's ``http-reuse`` does: an idle connection serves the next request to
the same upstream; it is closed after :data:`IDLE_TIMEOUT` (below uvicorn's 5 s
keep-alive, so HaRP rarely reuses a connection the ExApp is closing) or when more than
``max_idle`` wait for the same upstream.

One :class:`UpstreamConnection` carries one exchange at a time; its owner (the proxy's
forwarder) receives the events through the :class:`ExchangeHandler` protocol.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import _WrappingProtocol
from twisted.internet.interfaces import IReactorFDSet, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure

from harp.deadlines import Deadline, deadlines_for
from harp.splice import SPLICE_MIN, Splice, socket_fd
from harp.timers import cancel
from harp.web.response_body import ResponseBody
from harp.web.response_head import BadResponse, ResponseHead, body_framing, parse_response_head
from harp.writes import end_buffered_write, use_buffered_write

#: Seconds an idle upstream connection is kept for reuse.
IDLE_TIMEOUT: Final = 4.0


class ExchangeHandler(Protocol):
    """What a connection tells the owner of the exchange it carries."""

    def response_head(self, head: ResponseHead, whole: bool) -> None:
        """The upstream's answer begins; ``whole``: its entire body is already in hand
        (it will be delivered before the connection reads again)."""

    def response_data(self, data: bytes) -> None: ...

    def response_done(self) -> None: ...

    def exchange_failed(self, reason: str, before_response: bool) -> None: ...

    def splice_sink(self) -> Any:
        """The client's socket transport the rest of the body may be spliced to, the
        response head written to it already; None to have the body delivered by
        :meth:`response_data` (TLS, HTTP/2, a re-framed or finished response)."""

    def response_spliced(self, length: int) -> None:
        """``length`` more body bytes reached the client by splice."""

    def client_failed(self, reason: str) -> None:
        """Writing the spliced body to the client failed: the exchange is over."""

    def splice_abandoned(self) -> None:
        """The splice gave the body back: it comes by :meth:`response_data` again."""


#: Bytes asked of the kernel per read on an upstream connection (Twisted's default: 64 KiB).
#: With 256 KiB a 1 MB answer takes 4 reactor turns instead of 16: +10 to 60 % on 1 MB GETs,
#: no change on long 100 MB streams, and at most one more read (192 KiB) buffered per
#: connection before the client's backpressure pauses the upstream.
UPSTREAM_READ_SIZE: Final = 256 * 1024

#: Bytes asked per read while the response head is awaited: the body bytes that come
#: with the head go through the process, and a large body is spliced from there on
#: (harp/splice.py), so the first read is kept to Twisted's usual 64 KiB.
HEAD_READ_SIZE: Final = 64 * 1024


class UpstreamConnection(TwistedProtocol):
    """One keep-alive connection to an upstream, parsing one response at a time.

    States: ``idle`` (in the pool) → ``head`` (request sent, waiting for the answer) →
    ``body`` → ``idle`` again, or ``closed``.
    """

    def __init__(self, pool: ConnectionPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.state = "idle"
        self.handler: ExchangeHandler | None = None
        self.method = b"GET"
        self.buffer = b""
        #: Reads each answer's body (state ``body``); one reader for the connection's life.
        self.body = ResponseBody(self._deliver, self._body_done)
        self.reusable = False
        self.request_sent = True
        self.got_bytes = False
        #: The pool's idle limit (a coarse deadline, reused while the connection lives).
        self.idle_timer: Deadline | None = None
        self.reused = False
        #: The body being spliced to the client, if it is (harp/splice.py).
        self.splice: Splice | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        # Read the upstream in larger pieces than Twisted's 64 KiB: fewer reactor turns
        # per response body (docs/performance.md#upstream-reads).
        transport.bufferSize = UPSTREAM_READ_SIZE
        # Twisted's endpoints connect through a wrapper protocol that, once connected,
        # only hands each read and the close on to this one: the transport talks to this
        # protocol directly from now on (an interpreted call less per read).  Only that
        # wrapper, and only around this very protocol (an FRP tunnel's stream has none).
        wrapper = getattr(transport, "protocol", None)
        if type(wrapper) is _WrappingProtocol and wrapper._wrappedProtocol is self:
            transport.protocol = self
        use_buffered_write(transport)  # the request heads it writes (harp/writes.py)

    # --- the exchange

    def start(self, handler: ExchangeHandler, method: bytes, head: bytes) -> None:
        """Write the request head; the body (if any) is produced by the caller."""
        cancel(self.idle_timer)
        self.handler = handler
        self.method = method
        self.state = "head"
        self.buffer = b""
        self.got_bytes = False
        transport: Any = self.transport
        transport.bufferSize = HEAD_READ_SIZE
        transport.write(head)

    def detach(self) -> None:
        """The exchange's owner is gone: never reuse this connection."""
        self.handler = None
        self._cancel_splice()
        if self.state != "closed":
            self.state = "closed"
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.got_bytes = True
        state = self.state
        if state == "body":
            self._body(data)
        elif state == "head":
            self._head(data)
        else:
            # Bytes on an idle connection: the upstream is confused; never reuse it.
            self.state = "closed"
            if self.transport is not None:
                self.transport.loseConnection()

    def _head(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        while True:
            try:
                parsed = parse_response_head(self.buffer)
            except BadResponse as exc:
                return self._fail(f"bad response head: {exc}")
            if parsed is None:
                return None
            head, rest = parsed
            if not 100 <= head.status < 200:
                break
            if head.status == 101:
                return self._fail("101 without an upgrade request")
            self.buffer = rest  # an interim 1xx (100 Continue …): the answer follows
        self.buffer = b""
        try:
            framing, remaining = body_framing(head, self.method)
        except BadResponse as exc:
            return self._fail(str(exc))
        self.reusable = (
            framing != "close"
            and not head.raw.startswith(b"HTTP/1.0")
            and b"close" not in head.connection_tokens()
        )
        body = self.body
        body.start(framing, remaining)
        self.state = "body"
        handler = self.handler
        if handler is not None:
            handler.response_head(
                head, body.empty or (framing == "length" and len(rest) >= body.remaining)
            )
        if self.state != "body":
            return None  # the handler gave up on the exchange
        if body.empty:
            return self._complete(rest)
        if rest:
            self._body(rest)
        if self.state == "body" and body.framing == "length" and body.remaining >= SPLICE_MIN:
            self._splice()
        if self.splice is None and self.transport is not None:
            self.transport.bufferSize = UPSTREAM_READ_SIZE  # type: ignore[attr-defined]
        return None

    def _splice(self) -> None:
        """Hand the rest of a large body to the kernel, if both sockets allow it."""
        handler = self.handler
        source: Any = self.transport
        if (
            handler is None or not self.request_sent or socket_fd(source) is None
            or source.dataBuffer or source._tempDataLen  # the reader must own the fd alone
        ):
            return
        sink = handler.splice_sink()
        if sink is None or self.state != "body":
            return
        self.splice = Splice(
            cast(IReactorFDSet, self.pool.reactor), source, sink, self.body.remaining,
            handler.response_spliced, self._spliced, self._splice_failed, self._splice_refused,
        )
        self.splice.start()

    def _spliced(self) -> None:
        self.splice = None
        self.body.remaining = 0
        self._complete(b"")

    def _splice_failed(self, side: str, reason: str) -> None:
        self.splice = None
        if side == "upstream":
            self._fail(reason)
            return
        handler, self.handler = self.handler, None
        self.state = "closed"
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if handler is not None:
            handler.client_failed(reason)

    def _splice_refused(self, pending: bytes, remaining: int) -> None:
        """The kernel cannot splice: the rest of the body goes through :meth:`_body`."""
        self.splice = None
        if self.transport is not None:
            self.transport.bufferSize = UPSTREAM_READ_SIZE  # type: ignore[attr-defined]
        handler = self.handler
        if handler is not None:
            handler.splice_abandoned()
        self.body.remaining = len(pending) + remaining
        if pending:
            self._body(pending)

    def _cancel_splice(self) -> None:
        splice, self.splice = self.splice, None
        if splice is not None:
            splice.cancel()

    def _body(self, data: bytes) -> None:
        try:
            self.body.feed(data)
        except BadResponse as exc:
            self._fail(str(exc))

    def _deliver(self, data: bytes) -> None:
        handler = self.handler
        if handler is not None and data:
            handler.response_data(data)

    def _body_done(self, extra: bytes) -> None:
        if self.state == "body":  # not if the handler gave up while taking the last piece
            self._complete(extra)

    def _complete(self, extra: bytes) -> None:
        handler, self.handler = self.handler, None
        if extra or not self.reusable or not self.request_sent:
            # Bytes past the response, a close-delimited or HTTP/1.0 answer, or an
            # answer given before the request body was sent: not reusable.
            self.state = "closed"
            if self.transport is not None:
                self.transport.loseConnection()
        else:
            self.state = "idle"
            # The client side may have paused reading from us (its buffer was full)
            # just as the response ended: an idle connection must read again, or its
            # next exchange would stall (and a close by the upstream go unnoticed).
            assert self.transport is not None
            self.transport.resumeProducing()  # type: ignore[attr-defined]
            self.pool.release(self)
        if handler is not None:
            handler.response_done()

    def expire(self) -> None:
        """Idle too long in the pool (or the pool is closing): close, never reuse."""
        cancel(self.idle_timer)
        self.state = "closed"
        if self.transport is not None:
            self.transport.loseConnection()

    def _fail(self, reason: str) -> None:
        handler, self.handler = self.handler, None
        before = self.state == "head"
        self.state = "closed"
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if handler is not None:
            handler.exchange_failed(reason, before)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        end_buffered_write(self.transport)
        self._cancel_splice()
        cancel(self.idle_timer)
        self.idle_timer = None
        state, self.state = self.state, "closed"
        self.pool.forget(self)
        handler, self.handler = self.handler, None
        if handler is None:
            return
        if state == "body" and self.body.framing == "close":
            handler.response_done()
        elif state in ("head", "body"):
            handler.exchange_failed("upstream closed the connection", state == "head")


class ConnectionPool:
    """Idle upstream connections by (host, port), reused first-in, last-out."""

    def __init__(self, reactor: IReactorTime, max_idle: int = 256,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.reactor = reactor
        self.deadlines = deadlines_for(reactor)
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: dict[tuple[str, int], deque[UpstreamConnection]] = {}
        self.closing = False

    def take(self, key: tuple[str, int]) -> UpstreamConnection | None:
        """An idle connection to ``key``, or None (then connect a new one)."""
        idle = self.idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.state == "idle" and connection.transport is not None:
                connection.reused = True
                return connection
        return None

    def connect(
        self, key: tuple[str, int], endpoint: IStreamClientEndpoint
    ) -> Deferred[UpstreamConnection]:
        """A new connection to ``key`` (not yet in the pool)."""
        factory = Factory.forProtocol(lambda: UpstreamConnection(self, key))
        factory.noisy = False  # one "Starting factory" log line per connection otherwise
        return endpoint.connect(factory)  # type: ignore[return-value]

    def release(self, connection: UpstreamConnection) -> None:
        """``connection`` finished an exchange cleanly: keep it for the next one."""
        idle = self.idle.get(connection.key)
        if idle is None:  # not setdefault: that makes a deque on every call
            idle = self.idle[connection.key] = deque()
        if self.closing or len(idle) >= self.max_idle or connection.transport is None:
            connection.state = "closed"
            if connection.transport is not None:
                connection.transport.loseConnection()
            return
        idle.append(connection)
        connection.idle_timer = self.deadlines.rearm(
            connection.idle_timer, self.idle_timeout, connection.expire
        )

    def forget(self, connection: UpstreamConnection) -> None:
        idle = self.idle.get(connection.key)
        if idle is not None:
            try:
                idle.remove(connection)
            except ValueError:
                pass
            if not idle:
                del self.idle[connection.key]

    def close_all(self) -> None:
        """Close every idle connection and keep none from now on (shutdown)."""
        self.closing = True
        for idle in list(self.idle.values()):
            for connection in list(idle):
                connection.expire()
        self.idle.clear()

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self.idle.values())


class ChunkedWriter:
    """An ``IConsumer`` that frames what it is given as a chunked request body."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def write(self, data: bytes) -> None:
        if data:
            self.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))

    def finish(self) -> None:
        self.transport.write(b"0\r\n\r\n")

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()
