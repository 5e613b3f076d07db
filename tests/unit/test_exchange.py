"""The lean upstream HTTP/1.1 client (harp.web.exchange), in memory."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import epollreactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from harp.web.exchange import ChunkedWriter, ConnectionPool, UpstreamConnection
from harp.web.response_head import ResponseHead


class Handler:
    def __init__(self) -> None:
        self.head: ResponseHead | None = None
        self.data = b""
        self.done = False
        self.failed: tuple[str, bool] | None = None

    def response_head(self, head: ResponseHead, whole: bool) -> None:
        self.head = head
        self.whole = whole

    def response_data(self, data: bytes) -> None:
        self.data += data

    def response_done(self) -> None:
        self.done = True

    def exchange_failed(self, reason: str, before_response: bool) -> None:
        self.failed = (reason, before_response)


def _connection() -> tuple[ConnectionPool, UpstreamConnection, StringTransport]:
    pool = ConnectionPool(Clock(), max_idle=2)
    conn = UpstreamConnection(pool, ("127.0.0.1", 8080))
    transport = StringTransport()
    conn.makeConnection(transport)
    return pool, conn, transport


def _exchange(method: bytes, *answer: bytes) -> tuple[ConnectionPool, UpstreamConnection,
                                                      StringTransport, Handler]:
    pool, conn, transport = _connection()
    handler = Handler()
    conn.start(handler, method, method + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
    for piece in answer:
        conn.dataReceived(piece)
    return pool, conn, transport, handler


def test_content_length_body_then_reused() -> None:
    pool, conn, transport, handler = _exchange(
        b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"lo"
    )
    assert transport.value().startswith(b"GET / HTTP/1.1\r\n")
    assert handler.head is not None and handler.head.status == 200
    assert (handler.data, handler.done) == (b"hello", True)
    assert conn.state == "idle" and pool.take(conn.key) is conn


@pytest.mark.parametrize(
    ("method", "answer", "whole"),
    [(b"GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"], True),
     (b"GET", [b"HTTP/1.1 204 No Content\r\n\r\n"], True),
     (b"HEAD", [b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"], True),
     (b"GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"lo"], False),
     (b"GET", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"], False),
     (b"GET", [b"HTTP/1.1 200 OK\r\n\r\nabc"], False)],
)
def test_the_handler_is_told_whether_the_whole_body_is_in_hand(
    method: bytes, answer: list[bytes], whole: bool
) -> None:
    # What decides whether the proxy registers the upstream as the client's producer.
    _, _, _, handler = _exchange(method, *answer)
    assert handler.whole is whole


def test_chunked_body_decoded() -> None:
    pool, conn, _, handler = _exchange(
        b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"lo\r\n0\r\n\r\n",
    )
    assert (handler.data, handler.done) == (b"hello", True)
    assert pool.take(conn.key) is conn


def test_close_delimited_body_ends_with_the_connection() -> None:
    pool, conn, _transport, handler = _exchange(b"GET", b"HTTP/1.1 200 OK\r\n\r\nabc")
    assert not handler.done
    conn.connectionLost(None)  # type: ignore[arg-type]
    assert (handler.data, handler.done) == (b"abc", True)
    assert pool.take(conn.key) is None


def test_head_and_interim_answers() -> None:
    pool, conn, _, handler = _exchange(
        b"HEAD", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
    )
    assert handler.head is not None and handler.head.status == 200 and handler.done
    assert pool.take(conn.key) is conn


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
     b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
     b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxEXTRA"],
)
def test_not_reused(answer: bytes) -> None:
    pool, conn, transport, handler = _exchange(b"GET", answer)
    assert handler.done and handler.data == b"x"
    assert pool.take(conn.key) is None and transport.disconnecting


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     b"HTTP/1.1 101 Switching Protocols\r\n\r\n", b"garbage\r\n\r\n"],
)
def test_bad_answers_fail_before_the_response(answer: bytes) -> None:
    _, _, _, handler = _exchange(b"GET", answer)
    assert handler.failed is not None and handler.failed[1] is True
    assert handler.head is None


def test_upstream_closing_mid_body_fails_after_the_head() -> None:
    _, conn, _, handler = _exchange(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
    conn.connectionLost(None)  # type: ignore[arg-type]
    assert handler.failed == ("upstream closed the connection", False)


def test_answer_before_the_request_body_was_sent_is_not_reused() -> None:
    pool, conn, _ = _connection()
    handler = Handler()
    conn.start(handler, b"POST", b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\n")
    conn.request_sent = False
    conn.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert handler.done and pool.take(conn.key) is None


def test_paused_connection_reads_again_when_idle() -> None:
    _pool, conn, transport = _connection()
    handler = Handler()
    conn.start(handler, b"GET", b"GET / HTTP/1.1\r\n\r\n")
    transport.pauseProducing()  # the client side paused us mid-body
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert transport.producerState == "producing"


def test_pool_bounds_and_expiry() -> None:
    clock = Clock()
    pool = ConnectionPool(clock, max_idle=1, idle_timeout=4.0)
    first, second = (UpstreamConnection(pool, ("h", 1)) for _ in range(2))
    for conn in (first, second):
        conn.makeConnection(StringTransport())
        pool.release(conn)
    assert second.transport.disconnecting  # type: ignore[union-attr]
    clock.advance(5)
    assert first.transport.disconnecting  # type: ignore[union-attr]


def test_chunked_writer_frames() -> None:
    transport = StringTransport()
    writer = ChunkedWriter(transport)
    writer.write(b"hello")
    writer.write(b"")
    writer.finish()
    assert transport.value() == b"5\r\nhello\r\n0\r\n\r\n"


def test_a_splice_given_back_delivers_the_rest_through_the_process() -> None:
    # harp/splice.py hands back what it took from the upstream when the kernel refuses:
    # those bytes come first, the rest follows through dataReceived, the body ends
    # exactly at its length and the connection is reused.
    abandoned: list[bool] = []
    pool, conn, transport, handler = _exchange(
        b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab"
    )
    handler.splice_abandoned = lambda: abandoned.append(True)  # type: ignore[attr-defined]
    conn._splice_refused(b"cde", 5)  # 2 delivered, 3 taken by the splice, 5 still to read
    assert abandoned == [True] and handler.data == b"abcde" and not handler.done
    conn.dataReceived(b"fghij")
    assert (handler.data, handler.done) == (b"abcdefghij", True)
    assert conn.state == "idle" and pool.take(conn.key) is conn
    assert transport.value().startswith(b"GET / HTTP/1.1\r\n")


def test_a_connection_made_through_an_endpoint_is_read_directly() -> None:
    # Real sockets on an epoll reactor of its own: the endpoint's wrapper steps aside
    # once connected, and the response and the upstream's close still arrive.
    reactor: Any = epollreactor.EPollReactor()
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    class Upstream(Protocol):
        def dataReceived(self, data: bytes) -> None:
            assert self.transport is not None
            self.transport.write(answer)
            self.transport.loseConnection()

    port = reactor.listenTCP(0, Factory.forProtocol(Upstream), interface="127.0.0.1")
    pool = ConnectionPool(reactor)
    handler = Handler()
    seen: list[Any] = []
    closed: list[bool] = []

    def connected(conn: UpstreamConnection) -> None:
        transport: Any = conn.transport
        seen.append(transport.protocol)
        original = conn.connectionLost

        def lost(reason: Any) -> None:
            closed.append(True)
            original(reason)
            reactor.stop()

        conn.connectionLost = lost  # type: ignore[method-assign]
        conn.start(handler, b"GET", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    pool.connect(("127.0.0.1", port.getHost().port), endpoint).addCallback(connected)
    reactor.callLater(10, reactor.stop)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        port.stopListening()
    assert len(seen) == 1 and isinstance(seen[0], UpstreamConnection)
    assert (handler.data, handler.done, closed) == (b"ok", True, [True])
