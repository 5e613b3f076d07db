"""Request header blocks parsed once: the remembered parse gives the same headers.

Why: a client sends the same header lines request after request, so the one-pass head
parser remembers what a block of them became (harp.web.channel._PARSED_HEADERS).  Each
request must still get headers of its own, equal to a fresh parse of the same bytes, and
a block that sets the body's framing (Content-Length, Transfer-Encoding), changes the
channel besides its headers, so it is never remembered.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from harp.web import channel as channel_module
from harp.web.channel import HarpChannel
from harp.web.site import HarpSite

BLOCK = (b"Host: harp\r\nCookie: a=b; oc_sessionPassphrase=s\r\nX-Two: 1\r\n"
         b"x-two: 2\r\nAccept:  text/html \r\nAUTHORIZATION-APP-API: dXNlcjp0b2s=")


class _Headers(Resource):
    """Records each request's headers, then changes them (as a handler might)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[bytes, list[bytes]]] = []

    def render(self, request: Request) -> int:  # type: ignore[override]
        headers = {name: list(values) for name, values in
                   request.requestHeaders.getAllRawHeaders()}
        self.seen.append(headers)
        request.requestHeaders.addRawHeader(b"x-two", b"changed by a handler")
        request.requestHeaders.removeHeader(b"accept")
        request.setResponseCode(204)
        request.finish()
        return NOT_DONE_YET


@pytest.fixture
def resource() -> Iterator[_Headers]:
    channel_module._PARSED_HEADERS.clear()
    yield _Headers()
    channel_module._PARSED_HEADERS.clear()


def _channel(resource: Resource) -> HarpChannel:
    channel = HarpSite(resource, head_timeout=30.0).buildProtocol(None)
    assert isinstance(channel, HarpChannel)
    channel.clock = Clock()
    channel.makeConnection(StringTransport())
    return channel


def test_a_remembered_block_gives_each_request_equal_headers_of_its_own(
    resource: _Headers,
) -> None:
    channel = _channel(resource)
    for _ in range(3):
        channel.dataReceived(b"GET /exapps/a/x HTTP/1.1\r\n" + BLOCK + b"\r\n\r\n")
    # Split across reads: the line-by-line parser, nothing remembered involved.
    head = b"GET /exapps/a/x HTTP/1.1\r\n" + BLOCK + b"\r\n\r\n"
    split = _channel(resource)
    split.dataReceived(head[:30])
    split.dataReceived(head[30:])
    assert len(channel_module._PARSED_HEADERS) == 1
    first = resource.seen[0]
    assert first[b"X-Two"] == [b"1", b"2"] and first[b"Accept"] == [b"text/html"]
    assert resource.seen == [first] * 4  # a handler's changes never reach the next one


def test_a_block_with_framing_is_never_remembered(resource: _Headers) -> None:
    channel = _channel(resource)
    channel.dataReceived(
        b"POST /exapps/a/x HTTP/1.1\r\nHost: harp\r\nContent-Length: 2\r\n\r\nok"
    )
    assert resource.seen and not channel_module._PARSED_HEADERS
