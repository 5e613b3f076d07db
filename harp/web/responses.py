"""The responses HaRP generates itself, with the reference's exact bodies.

AppAPI and ExApp front-ends see these, so status lines and plain-text bodies match
the reference (docs/compatibility.md#generated-responses).
"""

from __future__ import annotations

import json
from typing import Any, Final, cast

from twisted.internet.interfaces import ITCPTransport
from twisted.python.failure import Failure
from twisted.web.server import Request

from harp.logs import HarpLogger
from harp.web.h2 import HarpH2Stream
from harp.web.response_head import ResponseHead

PLAIN: Final = b"text/plain"
JSON: Final = b"application/json"

_BODIES: Final = {
    400: b"400 Bad Request",
    401: b"401 Unauthorized",
    403: b"403 Forbidden",
    404: b"404 Not Found",
    503: b"503 Service Unavailable (HaRP)",
}


def send(request: Request, status: int, body: bytes, content_type: bytes = PLAIN) -> bytes:
    """Set status and headers for a small body and return it (for ``render``)."""
    request.setResponseCode(status)
    if status == 204:
        return b""
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.setHeader(b"cache-control", b"no-store")
    return body


def error(request: Request, status: int) -> bytes:
    """One of the plain-text error responses (400/401/403/404/503, as the reference)."""
    return send(request, status, _BODIES[status])


def send_json(request: Request, status: int, payload: Any) -> bytes:
    return send(request, status, json.dumps(payload, separators=(",", ":")).encode(), JSON)


def finish(request: Request, body: bytes) -> None:
    """Write a body produced by :func:`send`/:func:`error` (if any) and end the response."""
    if body:
        request.write(body)
    request.finish()


def drop(request: Request) -> None:
    """Close the connection without any response: the reference's "silent drop".

    Used for banned clients and probes, so that they learn nothing about the proxy.
    Also used to abort a response whose body cannot be completed.  On HTTP/2 only the
    request's stream is reset: the connection carries other clients' requests too
    (behind a reverse proxy) or the same client's.
    """
    channel = request.channel
    if channel is None:
        return
    if channel.transport is not None:
        cast(ITCPTransport, channel.transport).abortConnection()
    elif isinstance(channel, HarpH2Stream):
        channel.abortConnection()  # an HTTP/2 stream: reset it, not the connection


abort = drop


def gone(request: Request) -> bool:
    """Has the client gone: is the response over, or the client disconnected?

    Either way nothing more may be written; every asynchronous step checks this before
    it answers.  ``_disconnected`` is ``twisted.web``'s own flag, read only here.
    """
    return bool(request.finished or getattr(request, "_disconnected", False))


def internal_error(request: Request, failure: Failure, log: HarpLogger, what: str) -> None:
    """A bug while serving *request*: log it, then end the response the only way left.

    A started response is aborted (a truncated body must not look complete); otherwise
    the client gets the reference's ``503``.
    """
    log.failure(what, failure)
    if gone(request):
        return
    if request.startedWriting:
        abort(request)
    else:
        close_early(request)
        finish(request, error(request, 503))


def close_early(request: Request) -> None:
    """The request body (if any) will not be read: do not wait for it before answering.

    Only :class:`harp.web.site.HarpRequest` streams bodies and needs this.
    """
    close = getattr(request, "close_early", None)
    if close is not None:
        close()


def relay_head(request: Request, head: ResponseHead) -> None:
    """Give ``request`` the upstream's status and end-to-end headers.

    Hop-by-hop headers and those the upstream's ``Connection`` lists stay behind
    (RFC 9110 §7.6.1).  An upstream header replaces one of HaRP's own of the same name
    instead of doubling it (HaRP's ``Date`` is only added when the upstream sent none);
    repeated upstream headers are all kept.
    Over HTTP/1.x they are written as the parser checked them
    (:meth:`harp.web.site.HarpRequest.relay`); HTTP/2 needs them in ``Headers``.
    """
    relay = getattr(request, "relay", None)
    if relay is not None and not isinstance(request.channel, HarpH2Stream):
        lines, names = head.end_to_end_lines()
        relay(head.status, head.reason, lines, names)
        return
    kept = head.end_to_end()
    request.setResponseCode(head.status, head.reason)
    out = request.responseHeaders
    seen: set[bytes] = set()
    for name, value in kept:
        if name in seen:
            out.addRawHeader(name, value)
        else:
            seen.add(name)
            out.setRawHeaders(name, [value])
