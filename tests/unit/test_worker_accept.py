"""Workers sharing a listening socket accept one connection per wake-up.

Why: Twisted grows the number of connections a port accepts per wake-up after every
burst, and a worker that has grown it takes the next burst whole, leaving the other
worker idle (docs/performance.md).  ``SharedAcceptPort`` pins it to one.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import epollreactor
from twisted.internet.protocol import Factory, Protocol

from harp.workers.worker import SharedAcceptPort


def test_shared_port_accepts_one_connection_per_wake_up() -> None:
    reactor: Any = epollreactor.EPollReactor()
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        port.__class__ = SharedAcceptPort
        assert port.numberAccepts == 1
        port.numberAccepts = 120  # what Twisted's doRead does after a full burst
        assert port.numberAccepts == 1
    finally:
        port.stopListening()
