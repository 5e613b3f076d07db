"""The lean epoll dispatch on a real epoll reactor and real loopback sockets.

Why: :mod:`harp.poll` replaces the reactor's ``doIteration``, so everything an event
leads to must still happen: reads, writes, a peer's close, and a bug in one
connection's ``connectionLost`` must neither stop the reactor nor starve the other
descriptors that were ready in the same poll.  Each case runs on its own reactor
instance, so the process's global reactor is untouched.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from twisted.internet import epollreactor, main, selectreactor, tcp, unix
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from harp import poll
from tests.unit.loopback import tcp_connection


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class BrokenOnClose(Echo):
    """A connection whose ``connectionLost`` raises (a bug HaRP must survive)."""

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        raise RuntimeError("bug in connectionLost")


class BrokenOnData(Echo):
    """Raises on the first client's line (a bug in ``dataReceived``)."""

    def dataReceived(self, data: bytes) -> None:
        if data == b"hello 0":
            raise RuntimeError("bug in dataReceived")
        super().dataReceived(data)


def _serve(clients: int, server: type[Protocol]) -> list[bytes]:
    """``clients`` connections each send a line, read the echo and close."""
    reactor: Any = epollreactor.EPollReactor()
    assert poll.install(reactor)
    port = reactor.listenTCP(0, Factory.forProtocol(server), interface="127.0.0.1")
    echoed: list[bytes] = []

    class Client(Protocol):
        def __init__(self, n: int) -> None:
            self.n = n

        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(b"hello %d" % self.n)

        def dataReceived(self, data: bytes) -> None:
            echoed.append(data)
            assert self.transport is not None
            self.transport.loseConnection()
            self.ended()

        def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
            if not any(line.endswith(b" %d" % self.n) for line in echoed):
                echoed.append(b"closed %d" % self.n)  # dropped without an answer
                self.ended()

        def ended(self) -> None:
            if len(echoed) == clients:
                # Let the servers see the closes (and run their connectionLost) first.
                reactor.callLater(0.2, reactor.stop)

    for n in range(clients):
        factory = ClientFactory()
        factory.protocol = lambda n=n: Client(n)  # type: ignore[misc]
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    reactor.callLater(20, reactor.stop)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        port.stopListening()
    return sorted(echoed)


def test_reads_writes_and_closes_go_through() -> None:
    assert _serve(5, Echo) == sorted(b"hello %d" % n for n in range(5))


def test_a_failing_connection_lost_stops_neither_the_reactor_nor_the_others() -> None:
    assert _serve(5, BrokenOnClose) == sorted(b"hello %d" % n for n in range(5))


def test_a_failing_data_received_drops_that_connection_only() -> None:
    expected = [b"closed 0"] + [b"hello %d" % n for n in range(1, 5)]
    assert _serve(5, BrokenOnData) == sorted(expected)


def test_other_reactors_are_left_alone() -> None:
    reactor: Any = selectreactor.SelectReactor()
    before = reactor.doIteration
    assert not poll.install(reactor)
    assert reactor.doIteration == before


# The read done by the dispatch itself (harp/poll.py, read_plain), on connected loopback
# sockets wrapped in Twisted's own TCP connection.


class _Record(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


def _connection() -> tuple[tcp.Connection, _Record, socket.socket]:
    protocol = _Record()
    connection, peer = tcp_connection(protocol)
    return connection, protocol, peer


def test_a_plain_read_delivers_the_bytes_and_reports_the_close() -> None:
    connection, protocol, peer = _connection()
    with peer:
        assert poll.reads_plain(connection)
        assert poll.read_plain(connection) is None  # nothing yet: "would block"
        peer.sendall(b"hello")
        deadline = time.monotonic() + 5
        while not protocol.received and time.monotonic() < deadline:
            poll.read_plain(connection)
        assert protocol.received == [b"hello"]
        peer.shutdown(socket.SHUT_WR)
        time.sleep(0.05)
        assert poll.read_plain(connection) is main.CONNECTION_DONE
    connection.socket.close()


def test_a_reset_connection_reads_as_lost() -> None:
    connection, _, peer = _connection()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # RST
    time.sleep(0.05)
    assert poll.read_plain(connection) is main.CONNECTION_LOST
    connection.socket.close()


def test_readers_of_their_own_keep_them() -> None:
    connection, _, peer = _connection()
    with peer:
        connection.doRead = lambda: None  # type: ignore[method-assign]
        assert not poll.reads_plain(connection)  # an instance's own reader

        class Own(tcp.Connection):
            def doRead(self) -> None:
                return None

        own = Own(connection.socket, _Record(), connection.reactor)
        assert not poll.reads_plain(own)  # a class's own reader
        assert not poll.reads_plain(object())
    connection.socket.close()


def test_adding_a_reader_twice_is_one_registration() -> None:
    reactor: Any = epollreactor.EPollReactor()
    assert poll.install(reactor)
    connection, _, peer = _connection()
    connection.reactor = reactor
    with peer:
        fd = connection.fileno()
        connection.startReading()
        connection.startReading()  # what twisted.web does after every response
        assert fd in reactor._reads and reactor._selectables[fd] is connection
        connection.stopReading()
        assert fd not in reactor._reads and fd not in reactor._selectables
        connection.startReading()
        assert fd in reactor._reads
        connection.stopReading()
    connection.socket.close()


def test_a_unix_socket_reads_plainly_unless_its_protocol_takes_descriptors() -> None:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    protocol = _Record()
    connection = unix.Server(ours, protocol, None, None, 1, epollreactor.EPollReactor())
    protocol.makeConnection(connection)
    with peer, ours:
        assert poll.reads_plain(connection)
        peer.sendall(b"engine answer")
        deadline = time.monotonic() + 5
        while not protocol.received and time.monotonic() < deadline:
            poll.read_plain(connection)
        assert protocol.received == [b"engine answer"]

        @implementer(IFileDescriptorReceiver)
        class TakesDescriptors(_Record):
            def fileDescriptorReceived(self, descriptor: int) -> None: ...

        connection.protocol = TakesDescriptors()
        assert not poll.reads_plain(connection)  # Twisted's recvmsg keeps the descriptors
