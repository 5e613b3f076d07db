"""First-byte classification of incoming FRP connections.

frps decides how to treat a fresh TCP connection by peeking at single bytes,
never by configuration alone, and we do the same because it is more robust than
hoping the client's ``tcpMux``/``tls.enable`` match ours:

1. **Transport sniff** (first byte on the raw TCP stream):

   * ``0x17`` -- frpc's *custom TLS first byte* (``disableCustomTLSFirstByte =
     false``).  The byte is a marker only and must be **dropped**; the TLS
     ClientHello follows.
   * ``0x16`` -- a TLS handshake record (the default since frp 0.50).  The byte
     belongs to the ClientHello and must be **kept**.
   * anything else -- plain TCP (reject it when TLS is forced).

2. **Payload sniff** (first byte after TLS, or of a plain connection):

   * ``0x00`` -- yamux frame header version byte: a multiplexed session
     (``tcpMux = true``, the default).
   * ``o`` / ``w`` / ``v`` -- the type byte of ``Login`` / ``NewWorkConn`` /
     ``NewVisitorConn``: the connection itself carries FRP messages
     (``tcpMux = false``).
   * anything else -- not frpc (e.g. the websocket transport's ``GET /~!frp``);
     close the connection.

Twisted note: the first byte often arrives in the same segment
as the ClientHello, so the caller buffers what it has received, classifies it
here, and replays :func:`tls_bytes` into a ``TLSMemoryBIOProtocol`` instead of
calling ``startTLS`` after a partial read.
"""

from __future__ import annotations

import enum

__all__ = [
    "CUSTOM_TLS_FIRST_BYTE",
    "TLS_HANDSHAKE_BYTE",
    "YAMUX_VERSION_BYTE",
    "PayloadKind",
    "TransportKind",
    "sniff_payload",
    "sniff_transport",
    "tls_bytes",
]

CUSTOM_TLS_FIRST_BYTE = 0x17
"""frpc's optional marker byte sent before the ClientHello; not part of TLS."""

TLS_HANDSHAKE_BYTE = 0x16
"""TLS record content type ``handshake``: the first byte of every ClientHello."""

YAMUX_VERSION_BYTE = 0x00
"""yamux protocol version; the first byte of every yamux frame header."""


class TransportKind(enum.Enum):
    """What the first byte of a raw TCP connection says about its transport."""

    CUSTOM_TLS = "custom-tls"
    """``0x17`` marker: drop one byte, then run TLS over the rest."""

    TLS = "tls"
    """``0x16``: run TLS over the whole stream, first byte included."""

    PLAIN = "plain"
    """No TLS: the bytes are yamux or FRP messages directly."""


class PayloadKind(enum.Enum):
    """What the first plaintext byte says about the connection's framing."""

    YAMUX = "yamux"
    """A yamux session (frpc ``tcpMux = true``)."""

    LOGIN = "login"
    """A direct control connection starting with ``Login`` (``tcpMux = false``)."""

    WORK = "work"
    """A direct work connection starting with ``NewWorkConn``."""

    VISITOR = "visitor"
    """A direct visitor connection starting with ``NewVisitorConn`` (stcp/xtcp)."""

    UNKNOWN = "unknown"
    """Not something frpc sends over the ``tcp`` transport: close it."""

    @property
    def is_direct_messages(self) -> bool:
        """True when the connection carries FRP messages without yamux."""
        return self in (PayloadKind.LOGIN, PayloadKind.WORK, PayloadKind.VISITOR)


_PAYLOAD_BY_BYTE = {
    YAMUX_VERSION_BYTE: PayloadKind.YAMUX,
    ord("o"): PayloadKind.LOGIN,
    ord("w"): PayloadKind.WORK,
    ord("v"): PayloadKind.VISITOR,
}


def sniff_transport(data: bytes) -> TransportKind | None:
    """Classify a raw connection from the bytes buffered so far.

    Returns ``None`` while *data* is empty, so the caller can simply call this
    on every ``dataReceived`` until it gets an answer.  Only ``data[0]`` is
    inspected: frps reads exactly one byte, so a decision never
    depends on how TCP segmented the ClientHello.
    """
    if not data:
        return None
    first = data[0]
    if first == CUSTOM_TLS_FIRST_BYTE:
        return TransportKind.CUSTOM_TLS
    if first == TLS_HANDSHAKE_BYTE:
        return TransportKind.TLS
    return TransportKind.PLAIN


def tls_bytes(kind: TransportKind, data: bytes) -> bytes:
    """Return the part of *data* that must be replayed into the TLS layer.

    The ``0x17`` marker is not TLS and would make the handshake fail, so it is
    stripped for :attr:`TransportKind.CUSTOM_TLS`; for the other kinds the
    buffer is returned unchanged.  *data* must be the buffer that
    :func:`sniff_transport` classified (starting at the connection's first
    byte).
    """
    if kind is TransportKind.CUSTOM_TLS:
        if not data or data[0] != CUSTOM_TLS_FIRST_BYTE:
            raise ValueError("buffer does not start with the custom TLS byte")
        return data[1:]
    return data


def sniff_payload(data: bytes) -> PayloadKind | None:
    """Classify the plaintext of a connection (after TLS, or plain).

    Returns ``None`` while *data* is empty.  Nothing is consumed: the byte
    inspected is the first byte of a yamux header or of an FRP message, and the
    whole buffer must go to the chosen decoder.
    """
    if not data:
        return None
    return _PAYLOAD_BY_BYTE.get(data[0], PayloadKind.UNKNOWN)
