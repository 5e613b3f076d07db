"""Twisted's own TCP connection over a real loopback pair, for the reactor-level tests.

Why: :mod:`harp.poll` and :mod:`harp.writes` do steps of Twisted's ``doRead``, ``write``
and ``doWrite`` themselves; their tests need Twisted's real connection class on a real
socket, with the raw peer on the other end to read and write without a reactor.
"""

from __future__ import annotations

import socket

from twisted.internet import epollreactor, tcp
from twisted.internet.protocol import Protocol


def tcp_connection(protocol: Protocol) -> tuple[tcp.Connection, socket.socket]:
    """``protocol`` connected on one end (non-blocking); the raw peer (5 s timeout)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    ours.setblocking(False)
    peer.settimeout(5)
    connection = tcp.Connection(ours, protocol, epollreactor.EPollReactor())
    connection.connected = True  # as Twisted's client and server connections say
    protocol.makeConnection(connection)
    return connection, peer
