"""Workers sharing a listening socket each accept their share of the queue.

Why: Twisted grows the number of connections a port accepts per wake-up after every
burst, and a worker that has grown it takes the next burst whole, leaving the other
worker idle; one per wake-up instead leaves a big burst waiting (docs/performance.md).
``SharedAcceptPort`` takes the queued connections divided by the number of workers.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.protocol import Factory, Protocol

from harp.workers.worker import SharedAcceptPort, accept_queue_length


def test_shared_port_takes_its_share_of_the_queue() -> None:
    reactor: Any = epollreactor.EPollReactor()
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    clients: list[socket.socket] = []
    try:
        port.__class__ = SharedAcceptPort
        port.share = 2
        assert port.numberAccepts == 1  # nothing queued: still try one
        address = ("127.0.0.1", port.getHost().port)
        clients = [socket.create_connection(address) for _ in range(7)]
        deadline = time.monotonic() + 5
        while accept_queue_length(port.socket) < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert accept_queue_length(port.socket) == 7
        assert port.numberAccepts == 4  # 7 queued, 2 workers: ceil(7 / 2)
        port.numberAccepts = 120  # what Twisted's doRead does after a full burst
        assert port.numberAccepts == 4
    finally:
        for client in clients:
            client.close()
        port.stopListening()


def test_queue_length_of_a_socket_without_tcp_info_is_zero() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert accept_queue_length(left) == 0
