"""The tuned reactor serves: the lean poll dispatches, the write coalescer flushes."""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol

from harp import writes
from harp.tuning import tune


def test_a_tuned_reactor_flushes_writes_made_while_serving() -> None:
    reactor: Any = epollreactor.EPollReactor()
    threshold = gc.get_threshold()
    tune(reactor)
    coalescer = reactor.addWriter.__self__
    assert isinstance(coalescer, writes.WriteCoalescer)
    received: list[bytes] = []

    class Serve(Protocol):
        def dataReceived(self, data: bytes) -> None:
            assert self.transport is not None
            self.transport.write(data.upper())  # flushed by the coalescer

    class Client(Protocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(b"ping")

        def dataReceived(self, data: bytes) -> None:
            received.append(data)
            reactor.stop()

    port = reactor.listenTCP(0, Factory.forProtocol(Serve), interface="127.0.0.1")
    factory = ClientFactory()
    factory.protocol = Client
    reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    guard = reactor.callLater(10, reactor.stop)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        port.stopListening()
        if guard.active():
            guard.cancel()
        # The collector settled as in a real process: undone for the rest of the tests.
        gc.unfreeze()
        gc.set_threshold(*threshold)
    assert received == [b"PING"]
