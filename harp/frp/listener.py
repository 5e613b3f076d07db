"""The FRP listener: the Factory and Protocols that put the FRP layers onto a TCP connection.

Layering per accepted connection (docs/compatibility.md#frp-transport)::

    TCP ─► _Sniff ──(0x17: drop it │ 0x16: keep it)──► TLSMemoryBIOProtocol ─┐
              └──(plain, only with HP_FRP_DISABLE_TLS=true)─────────────────┤
                                                                            ▼
                                                         _Payload (sniff again)
                         0x00 ─► YamuxConnection ─► YamuxStream per stream ─┐
                 'o' / 'w' / 'v' ─► DirectStream (the connection itself) ───┤
                                                                            ▼
                                           FirstMessage ─► Control | parked work conn

Why sniff instead of trusting configuration: frps reads the first byte to find TLS and
relies on its own ``tcpMux`` matching the client's; sniffing both proved more
robust, and it lets one listener serve every frpc variant HaRP's users run.  The first
byte may arrive in the same segment as the ClientHello, so the TLS layer is created
after the fact and the buffered bytes are replayed into it (no ``startTLS``).

The raw TCP connection also carries an :class:`~harp.frp.backlog.OutputGuard`: below
TLS it sees every byte we owe the peer, and it stops reading from a peer that does not
read our answers (yamux Ping ACKs, Pongs) and drops it past a hard cap or a stall.

Mutual TLS uses the generated PKI (``$HP_CERTS_DIR/frp``): our certificate is
``server.crt``/``server.key`` and the client must present a certificate chaining to
``ca.crt`` (``VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT``), like the reference's frps with
``tls.force = true`` and ``trustedCaFile``.  With TLS enabled a plain client is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IAddress, IDelayedCall, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from harp import timers
from harp.frp import sniff
from harp.frp.backlog import OutputGuard, tcp_backlog, tls_backlog
from harp.frp.mux import YamuxConnection, YamuxStream
from harp.frp.service import FIRST_MESSAGE_TIMEOUT, FrpServer
from harp.frp.stream import DirectStream
from harp.logs import HarpLogger
from harp.pki import CA_CRT, SERVER_CRT, SERVER_KEY
from harp.tlsctx import apply_server_policy

__all__ = ["PLAINTEXT_WARNING", "FrpServerFactory", "FrpTLSConfigError", "FrpTLSContext"]

log = HarpLogger("harp.frp")

PLAINTEXT_WARNING: Final = (
    "HP_FRP_DISABLE_TLS=true: FRP runs WITHOUT TLS. frpc logins (including the shared key "
    "HP_SHARED_KEY in metadatas.token) and every tunnel (Docker API calls, ExApp traffic) "
    "cross the network unencrypted and can be read or hijacked by anyone on the path; "
    "only use this on a trusted network"
)
"""Logged once at start when the FRP listener runs without TLS: the token is checked in
Login's ``metas``, and frp's own cipher uses a key derived from ``""``
(docs/compatibility.md#frp-login, docs/compatibility.md#frp-encryption)."""

HANDSHAKE_TIMEOUT: Final = FIRST_MESSAGE_TIMEOUT
"""From accept until we know what the connection carries (TLS handshake included)."""


class FrpTLSConfigError(Exception):
    """The FRP certificate files cannot be used; the message names the file."""


@implementer(IOpenSSLServerConnectionCreator)
class FrpTLSContext:
    """Server side of FRP mutual TLS, built once from ``$HP_CERTS_DIR/frp``."""

    def __init__(self, certs_dir: Path) -> None:
        server_crt, server_key, ca_crt = (
            certs_dir / SERVER_CRT, certs_dir / SERVER_KEY, certs_dir / CA_CRT
        )
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        # The same modern policy as the HTTPS frontend (docs/security.md, TLS).
        apply_server_policy(ctx)
        current = server_crt
        try:
            ctx.use_certificate_chain_file(str(server_crt))
            current = server_key
            ctx.use_privatekey_file(str(server_key))
            ctx.check_privatekey()
            current = ca_crt
            ctx.load_verify_locations(str(ca_crt))
            ca = crypto.load_certificate(crypto.FILETYPE_PEM, ca_crt.read_bytes())
        except (SSL.Error, crypto.Error) as exc:
            raise FrpTLSConfigError(f"{current}: unusable for FRP TLS ({exc})") from None
        except OSError as exc:
            raise FrpTLSConfigError(f"{current}: cannot be read ({exc.strerror})") from None
        # Advertise our CA: Go's client only presents a certificate the server says it
        # accepts, and an empty list would also do, but naming it is what frps does.
        ctx.set_client_ca_list([ca.get_subject()])
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify)
        self._context = ctx

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def _verify(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
    # OpenSSL's chain verdict against ca.crt is the whole check: frps checks no name.
    return bool(ok)


class FrpServerFactory(Factory):
    """Accepts frpc connections on ``HP_FRP_ADDRESS`` for *server*.

    *server* is the :class:`~harp.frp.service.FrpServer` that logs the clients in (it
    alone knows the key, the bans and the tunnel registry); this factory only brings
    each connection to its first FRP message.  *tls* is the :class:`FrpTLSContext`
    (``None`` = ``HP_FRP_DISABLE_TLS=true``: plain only).
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        server: FrpServer,
        tls: IOpenSSLServerConnectionCreator | None,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.server = server
        self.handshake_timeout = handshake_timeout
        self.tls_factory: TLSMemoryBIOFactory | None = None
        if tls is not None:
            self.tls_factory = TLSMemoryBIOFactory(tls, False, Factory(), reactor)

    def startFactory(self) -> None:
        """The listener is up: with TLS off, say loudly what that means."""
        if self.tls_factory is None:
            # twisted's own Logger, not HarpLogger: no HP_LOG_LEVEL may hide this line.
            Logger(namespace="harp.frp").warn(PLAINTEXT_WARNING)

    def buildProtocol(self, addr: IAddress | None) -> _Sniff:
        return _Sniff(self)


class _Sniff(Protocol):
    """Raw TCP: decide TLS or plain from the first byte, then delegate everything."""

    def __init__(self, factory: FrpServerFactory) -> None:
        self.factory = factory
        self._buffer = b""
        self._next: Protocol | None = None
        self._timer: IDelayedCall | None = None
        self.peer = ""
        self._tls: TLSMemoryBIOProtocol | None = None
        self.guard: OutputGuard | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        peer = self.transport.getPeer()
        self.peer = str(getattr(peer, "host", peer))
        self._timer = self.factory.reactor.callLater(self.factory.handshake_timeout,
                                                     self._expired)
        # Bounds what this peer can make us queue, TLS or not, logged in or not.
        self.guard = OutputGuard(self.factory.reactor, self.transport, self._backlog,
                                 self.peer)

    def _backlog(self) -> int:
        pending = tcp_backlog(self.transport)
        if self._tls is not None:
            pending += tls_backlog(self._tls)
        return pending

    def identified(self) -> None:
        """The connection carries frp (first message seen): the deadline is over."""
        timers.cancel(self._timer)
        self._timer = None

    def _expired(self) -> None:
        self._timer = None
        log.info("FRP connection from {peer}: no FRP message within {secs:.0f}s, closing",
                 peer=self.peer, secs=self.factory.handshake_timeout)
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self._received(data)
        if self.guard is not None:
            self.guard.check()  # whatever this input made us write

    def _received(self, data: bytes) -> None:
        if self._next is not None:
            self._next.dataReceived(data)
            return
        self._buffer += data
        kind = sniff.sniff_transport(self._buffer)
        if kind is None:
            return
        buffered, self._buffer = self._buffer, b""
        transport: Any = self.transport
        payload = _Payload(self.factory, self)
        if kind is sniff.TransportKind.PLAIN:
            if self.factory.tls_factory is not None:
                log.info("FRP connection from {peer} refused: plain TCP, but TLS is required "
                         "(set transport.tls.enable = true in frpc, or HP_FRP_DISABLE_TLS=true)",
                         peer=self.peer)
                self.identified()
                transport.abortConnection()
                return
            self._next = payload
            payload.makeConnection(transport)
            payload.dataReceived(buffered)
            return
        if self.factory.tls_factory is None:
            log.info("FRP connection from {peer} refused: TLS, but HP_FRP_DISABLE_TLS=true "
                     "(set transport.tls.enable = false in frpc)", peer=self.peer)
            self.identified()
            transport.abortConnection()
            return
        tls = TLSMemoryBIOProtocol(self.factory.tls_factory, payload)
        self._next = self._tls = tls
        tls.makeConnection(transport)
        rest = sniff.tls_bytes(kind, buffered)
        if rest:  # the 0x17 marker often arrives alone; an empty feed confuses OpenSSL
            tls.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.identified()
        if self.guard is not None:
            self.guard.stop()
        if self._next is not None:
            self._next.connectionLost(reason)


class _Payload(Protocol):
    """Plaintext (after TLS, or plain): yamux session or a direct message stream."""

    def __init__(self, factory: FrpServerFactory, sniffer: _Sniff) -> None:
        self.factory = factory
        self.sniffer = sniffer
        self._buffer = b""
        self._mux: YamuxConnection | None = None
        self._direct: DirectStream | None = None
        self._decided = False

    def dataReceived(self, data: bytes) -> None:
        if self._mux is not None:
            self._mux.data_received(data)
            return
        if self._direct is not None:
            self._direct.data_received(data)
            return
        if self._decided:
            return
        self._buffer += data
        kind = sniff.sniff_payload(self._buffer)
        if kind is None:
            return
        self._decided = True
        buffered, self._buffer = self._buffer, b""
        transport: Any = self.transport
        server = self.factory.server
        guard = self.sniffer.guard
        if kind is sniff.PayloadKind.YAMUX:
            self._mux = YamuxConnection(transport, self.factory.reactor, self._new_stream,
                                        on_write=None if guard is None else guard.check)
            self._mux.data_received(buffered)
        elif kind.is_direct_messages:
            self._direct = DirectStream(transport, guard)
            server.new_stream(self._direct, self.sniffer.identified)
            self._direct.data_received(buffered)
        else:
            log.info("FRP connection from {peer}: not an frpc connection (first byte 0x{b:02x}), "
                     "closing", peer=self.sniffer.peer, b=buffered[0])
            self.sniffer.identified()
            transport.abortConnection()

    def _new_stream(self, stream: YamuxStream) -> None:
        self.factory.server.new_stream(stream, self.sniffer.identified)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._mux is not None:
            self._mux.connection_lost(reason)
        elif self._direct is not None:
            self._direct.connection_lost(reason)
        elif reason.check(SSL.Error):
            log.info("FRP connection from {peer}: TLS handshake failed: {error}",
                     peer=self.sniffer.peer, error=_ssl_reason(reason.value or Exception()))


def _ssl_reason(exc: BaseException) -> str:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list):
        parts = [str(p[2]) for p in args[0] if isinstance(p, tuple) and len(p) == 3]
        if parts:
            return "; ".join(parts)
    return str(exc) or type(exc).__name__
