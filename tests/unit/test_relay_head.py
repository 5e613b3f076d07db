"""An upstream's head relayed to an HTTP/1.x client, written from the parsed bytes.

Why: :meth:`harp.web.site.HarpRequest.relay` writes the response head itself instead of
going through twisted.web's ``Headers``, so everything twisted.web decided at the first
``write`` must still come out the same: HaRP's own ``Date`` replaced by the upstream's,
hop-by-hop headers left behind, chunked coding when there is no length (HTTP/1.1 only),
no body for ``HEAD``, 204 and 304, and a ``Connection: close`` HaRP added kept.
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from harp.web import responses
from harp.web.channel import HarpChannel
from harp.web.response_head import parse_response_head
from harp.web.site import HarpSite


class _Relay(Resource):
    """Relays one canned upstream head, then writes ``body`` and finishes."""

    isLeaf = True

    def __init__(self, upstream: bytes, body: bytes = b"") -> None:
        super().__init__()
        parsed = parse_response_head(upstream)
        assert parsed is not None
        self.head = parsed[0]
        self.body = body

    def render(self, request: Request) -> int:  # type: ignore[override]
        responses.relay_head(request, self.head)
        if self.body:
            request.write(self.body)
        request.finish()
        return NOT_DONE_YET


def _answer(upstream: bytes, request: bytes, body: bytes = b"") -> bytes:
    channel = HarpSite(_Relay(upstream, body), head_timeout=0).buildProtocol(None)
    assert isinstance(channel, HarpChannel)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(request)
    return transport.value()


GET = b"GET /exapps/app/x HTTP/1.1\r\nHost: h\r\n\r\n"


def _head(answer: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, [line.lower() for line in lines], body


def test_upstream_headers_as_sent_and_its_date_replaces_harps() -> None:
    status, lines, body = _head(_answer(
        b"HTTP/1.1 201 Made\r\nContent-Length: 2\r\nDate: then\r\nX-A: 1\r\nX-A: 2\r\n"
        b"Keep-Alive: timeout=5\r\nConnection: close, X-Secret\r\nX-Secret: s\r\n\r\n",
        GET, b"ok",
    ))
    assert status == b"HTTP/1.1 201 Made" and body == b"ok"
    assert lines == [b"content-length: 2", b"date: then", b"x-a: 1", b"x-a: 2"]


def test_harps_date_when_the_upstream_sends_none() -> None:
    _, lines, _ = _head(_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", GET))
    assert [line.split(b":")[0] for line in lines] == [b"date", b"content-length"]


def test_no_length_is_chunked_for_http11_and_plain_for_http10() -> None:
    upstream = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
    _, lines, body = _head(_answer(upstream, GET, b"hello"))
    assert b"transfer-encoding: chunked" in lines and body == b"5\r\nhello\r\n0\r\n\r\n"
    old = b"GET /exapps/app/x HTTP/1.0\r\nHost: h\r\n\r\n"
    status, lines, body = _head(_answer(upstream, old, b"hello"))
    assert status.startswith(b"HTTP/1.0 200")
    assert b"transfer-encoding: chunked" not in lines and body == b"hello"


@pytest.mark.parametrize(
    ("upstream", "request_head"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
         b"HEAD /exapps/app/x HTTP/1.1\r\nHost: h\r\n\r\n"),
        (b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n", GET),
        (b"HTTP/1.1 204 No Content\r\n\r\n", GET),
    ],
)
def test_no_body_after_a_head_request_204_or_304(upstream: bytes, request_head: bytes) -> None:
    _, lines, body = _head(_answer(upstream, request_head, b"hello"))
    assert body == b"" and b"transfer-encoding: chunked" not in lines


def test_a_close_harp_added_is_sent() -> None:
    class _CloseEarly(_Relay):
        def render(self, request: Request) -> int:  # type: ignore[override]
            request.setHeader(b"connection", b"close")
            return super().render(request)

    channel = HarpSite(
        _CloseEarly(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), head_timeout=0
    ).buildProtocol(None)
    assert isinstance(channel, HarpChannel)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(GET)
    _, lines, _ = _head(transport.value())
    assert b"connection: close" in lines
