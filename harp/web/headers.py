"""Header helpers shared by the pipeline, the control plane and the proxy."""

from __future__ import annotations

import hmac
from typing import Final

from twisted.web.server import Request

#: Hop-by-hop headers (RFC 9110 §7.6.1) plus the old proxy ones: they describe one
#: connection and are never relayed to the next hop.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    }
)


def last_header(request: Request, name: bytes) -> bytes | None:
    """The header's last value: the reference keeps the last of repeated headers."""
    values = request.requestHeaders.getRawHeaders(name)
    return values[-1] if values else None


class KeyCheck:
    """Constant-time comparison with the shared key (spec README, difference 4)."""

    __slots__ = ("_key",)

    def __init__(self, key: str) -> None:
        self._key = key.encode("ascii")

    def __call__(self, candidate: bytes | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate, self._key)
