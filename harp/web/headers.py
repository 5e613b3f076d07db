"""Header helpers shared by the pipeline, the control plane and the proxy."""

from __future__ import annotations

import hmac
import time
from typing import Final

from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.server import Request

#: Hop-by-hop headers (RFC 9110 §7.6.1) plus the old proxy ones: they describe one
#: connection and are never relayed to the next hop.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    }
)


def connection_listed(headers: Headers) -> frozenset[bytes]:
    """Header names a ``Connection`` header declares hop-by-hop (RFC 9110 §7.6.1).

    A proxy must not forward them; the common values (``keep-alive``, ``close``,
    ``upgrade``) are covered by :data:`HOP_BY_HOP` anyway, so this costs nothing
    when the header is absent.
    """
    values = headers.getRawHeaders(b"connection")
    if not values:
        return _EMPTY
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


_EMPTY: Final[frozenset[bytes]] = frozenset()


def last_header(request: Request, name: bytes) -> bytes | None:
    """The header's last value: the reference keeps the last of repeated headers."""
    values = request.requestHeaders.getRawHeaders(name)
    return values[-1] if values else None


class KeyCheck:
    """Constant-time comparison with the shared key (docs/differences.md#4)."""

    __slots__ = ("_key",)

    def __init__(self, key: str) -> None:
        self._key = key.encode("ascii")

    def __call__(self, candidate: bytes | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate, self._key)


_date_cache: list[int | bytes] = [0, b""]


def http_date() -> bytes:
    """The ``Date`` header value, formatted once per second rather than per request.

    Added when a response head is written (HTTP/1.x and HTTP/2), unless the upstream
    sent its own.
    """
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = datetimeToString(now)
    date = _date_cache[1]
    assert isinstance(date, bytes)
    return date
