"""The write coalescer on a real epoll reactor and real loopback sockets.

Why: :mod:`harp.writes` changes when Twisted sends — once per reactor turn instead of
after an epoll round trip — so the ways a connection's writing ends must still hold:
everything arrives in order, a send that falls short is finished when the socket drains,
a close after a write sends the write first, a producer is resumed, and a connection
that is still connecting (where "writable" means "connected") is left to the reactor.
Each case runs on its own reactor instance, so the process's global reactor is untouched.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet import epollreactor, tcp, unix
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from harp import writes
from tests.unit.loopback import tcp_connection

BIG = 8 * 1024 * 1024


class Collect(Protocol):
    """Reads everything, then reports it when the peer closes."""

    def __init__(self, done: Callable[[bytes], None]) -> None:
        self.chunks: list[bytes] = []
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.done(b"".join(self.chunks))


def run(server_behaviour: Callable[[Protocol], None],
        client_hello: bytes = b"") -> tuple[bytes, writes.WriteCoalescer, int]:
    """Serve one connection with ``server_behaviour``; return what the client read."""
    reactor: Any = epollreactor.EPollReactor()
    coalescer = writes.install(reactor)
    assert coalescer is not None
    assert writes.install(reactor) is coalescer  # installing twice changes nothing
    received: list[bytes] = []
    sends = [0]
    original = tcp.Connection.writeSomeData

    def counted(self: tcp.Connection, data: bytes) -> Any:
        sends[0] += 1
        return original(self, data)

    class Serve(Protocol):
        def connectionMade(self) -> None:
            server_behaviour(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Serve), interface="127.0.0.1")

    def finished(data: bytes) -> None:
        received.append(data)
        reactor.stop()

    class Client(Collect):
        def connectionMade(self) -> None:
            if client_hello:
                self.transport.write(client_hello)  # written while just connected

    factory = ClientFactory()
    factory.protocol = lambda: Client(finished)  # type: ignore[assignment,misc]
    reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    reactor.callLater(20, reactor.stop)
    tcp.Connection.writeSomeData = counted  # type: ignore[method-assign]
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        tcp.Connection.writeSomeData = original  # type: ignore[method-assign]
        port.stopListening()
    assert received, "the client never saw the connection end"
    return received[0], coalescer, sends[0]


def test_writes_of_one_turn_leave_in_one_send_and_arrive_before_the_close() -> None:
    def answer(protocol: Protocol) -> None:
        assert protocol.transport is not None
        for part in (b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n\r\n", b"ok"):
            protocol.transport.write(part)
        protocol.transport.loseConnection()

    data, coalescer, sends = run(answer)
    assert data == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert sends == 1  # the server's three writes (the client wrote nothing)
    assert not coalescer._pending and not coalescer._registered


def test_a_send_that_falls_short_is_finished_when_the_socket_drains() -> None:
    payload = bytes(range(256)) * (BIG // 256)

    def flood(protocol: Protocol) -> None:
        assert protocol.transport is not None
        protocol.transport.write(payload)
        protocol.transport.loseConnection()

    data, coalescer, sends = run(flood)
    assert data == payload
    assert sends > 1  # the kernel took it in parts: epoll reported the drain
    assert not coalescer._registered  # and the connection left epoll's write set


def test_a_producer_is_resumed_and_its_writes_are_kept_in_order() -> None:
    chunks = [bytes([n]) * 300_000 for n in range(20)]

    class Pull:
        """A pull producer: one chunk per resumeProducing, then close."""

        def __init__(self, transport: Any) -> None:
            self.transport = transport
            self.left = list(chunks)

        def resumeProducing(self) -> None:
            if self.left:
                self.transport.write(self.left.pop(0))
            else:
                self.transport.unregisterProducer()
                self.transport.loseConnection()

        def stopProducing(self) -> None:
            self.left = []

    def produce(protocol: Protocol) -> None:
        transport: Any = protocol.transport
        transport.registerProducer(Pull(transport), False)

    data, _, _ = run(produce)
    assert data == b"".join(chunks)


def test_a_connecting_client_writes_once_connected() -> None:
    seen: list[bytes] = []

    def read_then_close(protocol: Protocol) -> None:
        def got(data: bytes) -> None:
            seen.append(data)
            assert protocol.transport is not None
            protocol.transport.write(b"thanks")
            protocol.transport.loseConnection()

        protocol.dataReceived = got  # type: ignore[method-assign]

    data, _, _ = run(read_then_close, client_hello=b"hello")
    assert (b"".join(seen), data) == (b"hello", b"thanks")


def test_reactors_without_poll_dispatch_are_left_alone() -> None:
    assert writes.install(object()) is None


# The send done by the flush itself (harp/writes.py, send_now), on connected loopback
# sockets wrapped in Twisted's own TCP connection (its reactor never runs: the test
# calls send_now where the flush would).


def _connection() -> tuple[tcp.Connection, socket.socket]:
    return tcp_connection(Protocol())


def _read(peer: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = peer.recv(size - len(data))
        assert chunk, "the peer saw a close"
        data += chunk
    return data


def test_a_plain_write_is_sent_whole_and_the_buffers_left_empty() -> None:
    connection, peer = _connection()
    with peer, connection.socket:
        for part in (b"HTTP/1.1 200 OK\r\n", b"content-length: 2\r\n\r\n", b"ok"):
            connection.write(part)
        assert writes.send_now(connection)
        assert (connection.dataBuffer, connection._tempDataBuffer) == (b"", [])
        assert connection._tempDataLen == 0
        assert _read(peer, 40) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def test_a_short_send_keeps_the_rest_where_twisted_sends_it_from() -> None:
    connection, peer = _connection()
    with peer, connection.socket:
        payload = bytes(range(256)) * 512  # 128 KiB: at Twisted's send limit
        sent = b""
        while True:  # fill the kernel's buffers until a send falls short
            connection.write(payload)
            if not writes.send_now(connection):
                break
            sent += payload
        assert connection.dataBuffer == payload and connection.offset < len(payload)
        assert connection._tempDataBuffer == []
        rest = payload[connection.offset:]
        assert _read(peer, len(sent) + connection.offset) == sent + payload[:connection.offset]
        while connection.dataBuffer:  # what the reactor does once epoll reports space
            connection.doWrite()
        assert _read(peer, len(rest)) == rest


def test_what_twisted_must_finish_itself_is_left_to_it() -> None:
    connection, peer = _connection()
    with peer, connection.socket:
        connection.write(b"x" * (connection.SEND_LIMIT + 1))
        assert not writes.send_now(connection)  # more than one send of Twisted's
        assert connection._tempDataLen == connection.SEND_LIMIT + 1  # untouched

    connection, peer = _connection()
    with peer, connection.socket:
        connection.write(b"bye")
        connection.loseConnection()
        assert not writes.send_now(connection)  # the close waits for the send

    connection, peer = _connection()
    with peer, connection.socket:
        class Pull:
            def resumeProducing(self) -> None: ...
            def stopProducing(self) -> None: ...

        connection.registerProducer(Pull(), False)
        connection.write(b"more?")
        assert not writes.send_now(connection)  # a pull producer is resumed once drained

    connection, peer = _connection()
    with peer, connection.socket:
        connection.doWrite = lambda: None  # type: ignore[method-assign]  # a spliced body's
        connection.write(b"spliced")
        assert not writes.send_now(connection)
        assert not writes.send_now(object())


def test_a_unix_connection_is_sent_at_once_unless_a_descriptor_waits() -> None:
    """The local Docker engine's socket: Twisted's unix write is its TCP write after any
    queued descriptors, so with none queued the flush sends it itself."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.settimeout(5)
    with ours, theirs:
        connection = unix.Server(ours, Protocol(), None, None, 1, epollreactor.EPollReactor())
        connection.connected = True
        connection.reactor.addWriter = lambda _: None  # type: ignore[method-assign]
        assert writes.use_buffered_write(connection)  # the compiled write too
        connection.write(b"GET /_ping HTTP/1.1\r\n\r\n")
        assert writes.send_now(connection)
        assert connection._tempDataBuffer == [] and connection.dataBuffer == b""
        assert _read(theirs, 23) == b"GET /_ping HTTP/1.1\r\n\r\n"
        connection._sendmsgQueue.append(0)  # as sendFileDescriptor queues one
        connection.write(b"with a descriptor")
        assert not writes.send_now(connection)  # Twisted's doWrite passes it first
        assert connection._tempDataLen == 17
        writes.end_buffered_write(connection)


# The compiled write (harp/writes.py, buffered_write): Twisted's FileDescriptor.write,
# step by step, as a plain TCP connection's own write.


def test_a_plain_connection_writes_through_the_compiled_steps() -> None:
    connection, peer = _connection()
    with peer, connection.socket:
        asked: list[Any] = []
        connection.reactor.addWriter = asked.append  # type: ignore[method-assign]
        assert writes.use_buffered_write(connection)
        assert not writes.use_buffered_write(connection)  # once
        connection.write(b"head ")
        connection.write(b"")  # nothing: no flush asked
        connection.write(b"body")
        assert connection._tempDataBuffer == [b"head ", b"body"]
        assert connection._tempDataLen == 9 and asked == [connection, connection]
        with pytest.raises(TypeError, match="Data must be bytes"):
            connection.write("text")  # type: ignore[arg-type]
        assert writes.send_now(connection)
        assert _read(peer, 9) == b"head body"
        writes.end_buffered_write(connection)
        assert "write" not in vars(connection)  # no reference cycle left behind


def test_a_full_buffer_pauses_a_streaming_producer_and_a_closed_one_drops() -> None:
    connection, peer = _connection()
    with peer, connection.socket:
        connection.reactor.addWriter = lambda _: None  # type: ignore[method-assign]
        writes.use_buffered_write(connection)

        class Push:
            paused = 0

            def pauseProducing(self) -> None:
                self.paused += 1

            def resumeProducing(self) -> None: ...
            def stopProducing(self) -> None: ...

        push = Push()
        connection.registerProducer(push, True)
        connection.write(b"x" * connection.bufferSize)
        assert push.paused == 0  # at the limit, not over it
        connection.write(b"x")
        assert push.paused == 1 and connection.producerPaused
        connection.connected = False
        connection.write(b"lost")
        assert connection._tempDataLen == connection.bufferSize + 1  # dropped, as Twisted does
        writes.end_buffered_write(connection)


def test_only_plain_tcp_connections_get_the_compiled_write() -> None:
    connection, peer = _connection()
    with peer, connection.socket:

        class OwnWrite(tcp.Connection):
            def write(self, data: bytes) -> None: ...

        assert not writes.use_buffered_write(OwnWrite(connection.socket, Protocol()))
        assert not writes.use_buffered_write(StringTransport())
        writes.end_buffered_write(StringTransport())  # nothing given, nothing taken
