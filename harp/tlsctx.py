"""TLS contexts: the HTTPS frontend's certificate, reloadable on SIGHUP.

The operator renews ``$HP_CERTS_DIR/cert.pem`` (certificate chain and private key in
one PEM file, as the reference's HAProxy reads it) and sends SIGHUP.  New connections
then use the new certificate while established ones keep theirs, so nothing is
dropped.  A broken new file is refused and the old certificate stays in service.

Every server context gets one policy, the "intermediate" profile of current TLS
guidance, in two spellings: :func:`load_frontend_context` for the HTTPS frontend
(standard library ``ssl``, harp/web/https.py) and :func:`apply_server_policy` for the
FRP server (pyOpenSSL, which checks frpc's client certificates): TLS 1.2 or newer,
forward-secret ECDHE key exchange with AEAD ciphers only (no static-RSA, no CBC, no
SHA-1 MACs), the server's cipher order, no compression (CRIME) and no renegotiation
(client-initiated renegotiation is a cheap CPU DoS).  TLS 1.3 keeps OpenSSL's defaults,
which are all AEAD.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Final

from OpenSSL import SSL

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


def load_frontend_context(pem: Path, http2: bool = True) -> ssl.SSLContext:
    """The HTTPS frontend's context (standard library ``ssl``, harp/web/https.py) from
    one PEM (chain and key), with the policy of :func:`apply_server_policy`.

    ALPN offers ``h2`` (if ``http2``, ``HP_HTTP2``), ``http/1.1`` and ``http/1.0``, the
    server's order of preference winning.  A client offering only protocols we do not
    speak (``h2`` with ``HP_HTTP2=false``) must not get a failed handshake: like a
    server without ALPN, OpenSSL then finishes it without selecting a protocol, and the
    client falls back to HTTP/1.1 (curl, browsers and Go all do).  Selecting a protocol
    it did not offer would violate RFC 7301, and a fatal alert would make HaRP
    unreachable for it.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
        | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    )
    ctx.set_ciphers(TLS12_CIPHERS)
    try:
        ctx.load_cert_chain(str(pem))
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"{pem}: not a usable PEM certificate chain with its private key "
            f"({exc.reason or exc.strerror or 'unknown OpenSSL error'})"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"{pem}: cannot be read ({exc.strerror})") from None
    ctx.set_alpn_protocols([p.decode("ascii") for p in (ALPN_PROTOCOLS if http2 else ALPN_HTTP1)])
    return ctx


class ReloadableServerContext:
    """Hands each new HTTPS connection the current context; :meth:`reload` swaps it."""

    def __init__(self, pem: Path, http2: bool = True) -> None:
        self.path = pem
        self.http2 = http2
        self._context = load_frontend_context(pem, http2)

    def server_context(self) -> ssl.SSLContext:
        return self._context

    def reload(self) -> None:
        """Load the file again; on error keep the current context and raise."""
        self._context = load_frontend_context(self.path, self.http2)
