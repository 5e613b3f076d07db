"""Header helpers shared by the pipeline, the control plane and the proxy."""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence
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


#: Whether ``Headers`` keeps its headers in a ``_rawHeaders`` dict (every Twisted since
#: 2010); if a later one does not, :func:`header_values` asks ``getRawHeaders`` and the
#: request-header memo (harp/web/site.py) remembers nothing.
HEADERS_DICT: Final = isinstance(getattr(Headers(), "_rawHeaders", None), dict)

#: The key ``Headers`` stores each name HaRP looks up under (lower case before Twisted
#: 24.7, Header-Case since): found once per name by storing it, as Twisted does.
_KEYS: dict[bytes, bytes] = {}


def _key(name: bytes) -> bytes:
    probe = Headers()
    probe.addRawHeader(name, b"")
    key: bytes = next(iter(probe.getAllRawHeaders()))[0]
    _KEYS[name] = key  # names are constants of HaRP's code: a handful of entries
    return key


def header_values(headers: Headers, name: bytes) -> Sequence[bytes] | None:
    """``headers.getRawHeaders(name)`` for a constant ``name``, without re-encoding it.

    Why: ``getRawHeaders`` canonicalises the name on every call; the request path asks
    for five headers per request (docs/performance.md).  ``name`` must be one of HaRP's
    own constants, never client input (:data:`_KEYS` keeps every name it is given).
    """
    if not HEADERS_DICT:
        return headers.getRawHeaders(name)
    values: list[bytes] | None = headers._rawHeaders.get(_KEYS.get(name) or _key(name))
    return values or None


def last_header(request: Request, name: bytes) -> bytes | None:
    """The header's last value: the reference keeps the last of repeated headers."""
    values = header_values(request.requestHeaders, name)
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
