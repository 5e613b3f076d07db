"""The FRP frontend's Factory.

The listener is bound from the start so the address is reserved and health checks
see it; the protocol stack (sniff → TLS → yamux → control) plugs in here.  Until it
does, a connection is closed right away with a log line, so an frpc client retries
instead of hanging.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol

from harp.logs import HarpLogger

log = HarpLogger()


class _Refuse(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        peer = self.transport.getPeer()
        log.warn("FRP connection from {peer} refused: FRP server not available", peer=peer)
        self.transport.loseConnection()


class FrpServerFactory(Factory):
    protocol = _Refuse
    noisy = False
