"""The lean epoll dispatch on a real epoll reactor and real loopback sockets.

Why: :mod:`harp.poll` replaces the reactor's ``doIteration``, so everything an event
leads to must still happen: reads, writes, a peer's close, and a bug in one
connection's ``connectionLost`` must neither stop the reactor nor starve the other
descriptors that were ready in the same poll.  Each case runs on its own reactor
instance, so the process's global reactor is untouched.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import epollreactor, selectreactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure

from harp import poll


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
