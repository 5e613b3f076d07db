"""The HTTPS frontend's TLS layer, on the standard library's ``ssl`` module.

Why: with Twisted's ``TLSMemoryBIOProtocol`` (pyOpenSSL through cffi) a small request
over HTTPS cost HaRP ≈ 25 µs more than over plain HTTP
(docs/performance.md#https-on-the-standard-librarys-ssl):
every record goes through cffi buffers, every "nothing more to read" is a Python
exception built by pyOpenSSL, and small writes wait for an extra reactor turn to be
aggregated.  ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` does the same work in C.

:class:`TLSServerProtocol` sits between the TCP transport and the HTTP channel, like
Twisted's TLS wrapper: bytes from the client go into the incoming BIO, the handshake
runs, and decrypted bytes go to the channel; what the channel writes is encrypted into
the outgoing BIO and written to the socket.  Flow control stays the TCP transport's: the
channel registers itself (and later an HTTP/2 connection) as the transport's producer
through the wrapper.  The wrapped protocol is connected at once (its head deadline also
covers a slow handshake); what it writes before the handshake completes is kept and
sent after it.  ``negotiatedProtocol`` is the ALPN choice once the handshake is done.

Closing is lingering, as HAProxy's: HaRP's last bytes (a final response, an HTTP/2
GOAWAY, the close_notify) are followed by a FIN, not by a full close, and what the client
still sends is read and thrown away until it closes too, or for at most
:data:`LINGER` seconds.  Closing a socket with unread bytes in it makes the kernel send a
reset, and a client that receives a reset may lose what it had not read yet (a client
flooding HTTP/2 frames lost the GOAWAY that told it why).

The certificate and policy come from :class:`harp.tlsctx.ReloadableServerContext`
(SIGHUP swaps the context for new connections).  The FRP server keeps Twisted's TLS
with pyOpenSSL: it needs client certificates checked against HaRP's own CA.
"""

from __future__ import annotations

import ssl
from typing import Any, Final, Protocol

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.logger import LogLevel
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import alsoProvides

from harp import logs
from harp.deadlines import Deadline, deadlines_for
from harp.logs import HarpLogger
from harp.writes import end_buffered_write, use_buffered_write

log = HarpLogger("harp.https")

#: Plaintext asked of the TLS object per read (at most one TLS record is 16 KiB).
READ_SIZE = 64 * 1024

#: Seconds a closing connection keeps reading (and discarding) what the client still
#: sends, after HaRP's FIN, before it is cut (see the module's docstring).
LINGER: Final = 2.0


class ContextSource(Protocol):
    """Gives the current server context (:class:`harp.tlsctx.ReloadableServerContext`)."""

    def server_context(self) -> ssl.SSLContext: ...


class TLSServerProtocol(ProtocolWrapper):
    """One client connection: TLS on the socket, the HTTP channel on top.

    States: ``handshake`` → ``open`` → ``closing`` (close_notify sent, the TCP
    connection closes once its buffer is written); any → ``failed`` on a TLS error
    (the alert, if any, is sent, then the connection closes).
    """

    #: The ALPN protocol chosen in the handshake (``b"h2"``, ``b"http/1.1"``) or None.
    negotiatedProtocol: bytes | None = None
    factory: TLSServerFactory

    def __init__(self, factory: TLSServerFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)  # type: ignore[arg-type]
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = factory.contexts.server_context().wrap_bio(
            self._incoming, self._outgoing, server_side=True
        )
        self.state = "handshake"
        self._early: list[bytes] = []
        self._linger: Deadline | None = None

    def makeConnection(self, transport: Any) -> None:
        use_buffered_write(transport)
        super().makeConnection(transport)
        # After ProtocolWrapper copied the TCP transport's interfaces onto this wrapper.
        alsoProvides(self, ISSLTransport)

    # --- from the client

    def dataReceived(self, data: bytes) -> None:
        if self.state in ("closing", "failed"):
            return  # nothing more is read; the BIO must not grow meanwhile
        self._incoming.write(data)
        if self.state == "handshake":
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._send_tls()
                return
            except (ssl.SSLError, OSError, ValueError) as exc:
                self._failed(exc)
                return
            self.state = "open"
            alpn = self._tls.selected_alpn_protocol()
            self.negotiatedProtocol = alpn.encode("ascii") if alpn else None
            self._send_tls()
            early, self._early = self._early, []
            for piece in early:
                self.write(piece)
        tls = self._tls
        incoming = self._incoming
        wrapped = self.wrappedProtocol
        while self.state == "open":
            if not incoming.pending and not tls.pending():
                # Nothing left to decrypt: a read would only raise SSLWantReadError, an
                # exception built for every request otherwise.
                break
            try:
                plain = tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                plain = b""
            except (ssl.SSLError, OSError, ValueError) as exc:
                self._failed(exc)
                return
            if not plain:
                self.loseConnection()  # the client's close_notify: answer it and close
                return
            wrapped.dataReceived(plain)
            wrapped = self.wrappedProtocol
            if wrapped is None:
                return  # the connection was lost while the channel had the bytes
        # Reading can produce bytes to send (TLS 1.3 tickets, key updates, alerts).
        if self._outgoing.pending:
            self._send_tls()

    # --- to the client

    def write(self, data: bytes) -> None:
        if self.state == "open":
            if data:
                try:
                    self._tls.write(data)
                except (ssl.SSLError, OSError, ValueError) as exc:
                    self._failed(exc)
                    return
                self.transport.write(self._outgoing.read())  # type: ignore[union-attr]
        elif self.state == "handshake":
            self._early.append(bytes(data))

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.state in ("closing", "failed") or self.transport is None:
            return
        if self.state == "open":
            try:
                self._tls.unwrap()  # close_notify; the client's answer is not awaited
            except (ssl.SSLError, OSError, ValueError):
                pass
        self.state = "closing"
        self.disconnecting = 1
        self._send_tls()
        transport: Any = self.transport
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
            return
        # FIN once the last bytes are written; reading goes on (dataReceived discards in
        # this state) until the client closes or LINGER ends.
        half_close()
        self._linger = deadlines_for(self.factory.clock).call_later(LINGER, self._cut)

    def _cut(self) -> None:
        """The client kept its side open past LINGER: end the connection."""
        self._linger = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        end_buffered_write(self.transport)
        linger, self._linger = self._linger, None
        if linger is not None:
            linger.cancel()
        super().connectionLost(reason)

    def abortConnection(self) -> None:
        self.state = "failed"
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def getPeerCertificate(self) -> None:
        """No client certificates on the HTTPS frontend."""
        return None

    # --- internals

    def _send_tls(self) -> None:
        if self._outgoing.pending and self.transport is not None:
            self.transport.write(self._outgoing.read())

    def _failed(self, exc: Exception) -> None:
        """A handshake or record error: send the alert OpenSSL wrote, then close."""
        if logs.enabled(LogLevel.debug):  # a scanner's flood costs no formatting
            log.debug("TLS connection from {peer} failed: {error}", peer=_peer(self), error=exc)
        self.state = "failed"
        self._send_tls()
        if self.transport is not None:
            self.transport.loseConnection()


def _peer(protocol: TLSServerProtocol) -> str:
    peer = protocol.transport.getPeer() if protocol.transport is not None else None
    return str(getattr(peer, "host", "?"))


class TLSServerFactory(WrappingFactory):
    """Wraps the frontend's site: every accepted connection gets a TLS layer."""

    protocol = TLSServerProtocol  # type: ignore[assignment]
    noisy = False
    #: Times the lingering close (a test's fake clock may stand in).
    clock: IReactorTime = _reactor  # type: ignore[assignment]

    def __init__(self, contexts: ContextSource, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.contexts = contexts

    def buildProtocol(self, addr: Any) -> TLSServerProtocol | None:  # type: ignore[override]
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return TLSServerProtocol(self, inner)
