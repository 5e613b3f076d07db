"""TLS contexts: the HTTPS frontend's certificate, reloadable on SIGHUP.

The operator renews ``$HP_CERTS_DIR/cert.pem`` (certificate chain and private key in
one PEM file, as the reference's HAProxy reads it) and sends SIGHUP.  New connections
then use the new certificate while established ones keep theirs, so nothing is
dropped.  A broken new file is refused and the old certificate stays in service.

Every server context gets one policy (:func:`apply_server_policy`), the "intermediate"
profile of current TLS guidance: TLS 1.2 or newer, forward-secret ECDHE key exchange
with AEAD ciphers only (no static-RSA, no CBC, no SHA-1 MACs), the server's cipher
order, no compression (CRIME) and no renegotiation (client-initiated renegotiation is
a cheap CPU DoS).  TLS 1.3 keeps OpenSSL's defaults, which are all AEAD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

#: TLS 1.2 suites: ECDHE (ECDSA or RSA certificates) with AES-GCM or ChaCha20-Poly1305.
TLS12_CIPHERS: Final = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
))
#: ALPN protocols we serve, in our order of preference: HTTP/2 first when enabled
#: (``HP_HTTP2``), then HTTP/1.1, which WebSocket clients ask for.
ALPN_PROTOCOLS: Final = (b"h2", b"http/1.1", b"http/1.0")
ALPN_HTTP1: Final = (b"http/1.1", b"http/1.0")
#: Not every OpenSSL/pyOpenSSL build exposes these; 0 leaves the option out.
_OP_NO_RENEGOTIATION: Final[int] = getattr(SSL, "OP_NO_RENEGOTIATION", 0)


class TLSConfigError(Exception):
    """A certificate or key file cannot be used; the message names the file."""


def apply_server_policy(ctx: SSL.Context) -> None:
    """Restrict ``ctx`` to the modern server policy described in the module docstring.

    Shared by the HTTPS frontend and the FRP server, so both answer scanners the same.
    Go's crypto/tls (frpc) negotiates TLS 1.3, and its TLS 1.2 fallback includes the
    ECDHE-GCM suites, so real frpc clients are unaffected.
    """
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | _OP_NO_RENEGOTIATION
    )
    ctx.set_cipher_list(TLS12_CIPHERS.encode("ascii"))


def load_server_context(pem: Path, http2: bool = True) -> SSL.Context:
    """Build a server context (:func:`apply_server_policy`) from one PEM: chain and key.

    ``http2`` (``HP_HTTP2``) decides whether ``h2`` is offered by ALPN.
    """
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    apply_server_policy(ctx)
    try:
        ctx.use_certificate_chain_file(str(pem))
        ctx.use_privatekey_file(str(pem))
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise TLSConfigError(
            f"{pem}: not a usable PEM certificate chain with its private key ({_reason(exc)})"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"{pem}: cannot be read ({exc.strerror})") from None
    ctx.set_alpn_select_callback(select_alpn if http2 else select_alpn_http1)
    return ctx


def select_alpn(
    conn: SSL.Connection, offered: list[bytes], ours: tuple[bytes, ...] = ALPN_PROTOCOLS
) -> bytes | SSL._NoOverlappingProtocols:
    """Our first protocol the client offered (``h2``, ``http/1.1``), else no ALPN at all.

    A client offering only protocols we do not speak (``h2`` with ``HP_HTTP2=false``)
    must not get a failed handshake: like a server without ALPN, we finish it without
    selecting a protocol, and the client falls back to HTTP/1.1 (curl, browsers and Go
    all do).  Selecting a protocol it did not offer would violate RFC 7301, and a fatal
    alert would make HaRP unreachable for it.
    """
    for protocol in ours:
        if protocol in offered:
            return protocol
    # pyOpenSSL (>= 20, we require 24.2) turns this into SSL_TLSEXT_ERR_NOACK.
    return SSL.NO_OVERLAPPING_PROTOCOLS


def select_alpn_http1(
    conn: SSL.Connection, offered: list[bytes]
) -> bytes | SSL._NoOverlappingProtocols:
    """:func:`select_alpn` without ``h2`` (``HP_HTTP2=false``)."""
    return select_alpn(conn, offered, ALPN_HTTP1)


def _reason(exc: SSL.Error) -> str:
    details = [part[2] for part in exc.args[0] if isinstance(part, tuple) and len(part) == 3]
    return "; ".join(str(d) for d in details) or "unknown OpenSSL error"


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerContext:
    """Hands each new TLS connection the current context; :meth:`reload` swaps it."""

    def __init__(self, pem: Path, http2: bool = True) -> None:
        self.path = pem
        self.http2 = http2
        self._context = load_server_context(pem, http2)

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def reload(self) -> None:
        """Load the file again; on error keep the current context and raise."""
        self._context = load_server_context(self.path, self.http2)
