"""TLS contexts: the HTTPS frontend's certificate, reloadable on SIGHUP.

The operator renews ``$HP_CERTS_DIR/cert.pem`` (certificate chain and private key in
one PEM file, as the reference's HAProxy reads it) and sends SIGHUP.  New connections
then use the new certificate while established ones keep theirs, so nothing is
dropped.  A broken new file is refused and the old certificate stays in service.
"""

from __future__ import annotations

from pathlib import Path

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer


class TLSConfigError(Exception):
    """A certificate or key file cannot be used; the message names the file."""


def load_server_context(pem: Path) -> SSL.Context:
    """Build a TLS 1.2+ server context from one PEM file holding chain and key."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
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
    # We speak HTTP/1.1 only; say so, so clients never try h2 on us.
    ctx.set_alpn_select_callback(_select_http11)
    return ctx


def _select_http11(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    # Returning b"" would abort the handshake; a client that offers only other
    # protocols gets http/1.1 anyway and an HTTP/1.1 answer it may not parse,
    # which is the behaviour of servers without ALPN.
    return b"http/1.1"


def _reason(exc: SSL.Error) -> str:
    details = [part[2] for part in exc.args[0] if isinstance(part, tuple) and len(part) == 3]
    return "; ".join(str(d) for d in details) or "unknown OpenSSL error"


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerContext:
    """Hands each new TLS connection the current context; :meth:`reload` swaps it."""

    def __init__(self, pem: Path) -> None:
        self.path = pem
        self._context = load_server_context(pem)

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def reload(self) -> None:
        """Load the file again; on error keep the current context and raise."""
        self._context = load_server_context(self.path)
