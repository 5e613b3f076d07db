"""HTTP/2 streams and bounds, in memory: an h2 client talks to a HarpChannel whose
transport negotiated ``h2`` (the interop suite does the same over real TLS)."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from harp.web import h2 as harp_h2
from harp.web.body import WINDOW
from harp.web.channel import HarpChannel
from harp.web.site import HarpRequest, HarpSite


class _Answer(Resource):
    """``/hold`` answers nothing; anything else gets an early 403, as the pipeline's."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[HarpRequest] = []

    def render(self, request: Request) -> int:  # type: ignore[override]
        assert isinstance(request, HarpRequest)
        self.seen.append(request)
        if request.path != b"/hold":
            request.close_early()
            request.setResponseCode(403)
            request.setHeader(b"content-length", b"2")
            request.write(b"no")
            request.finish()
        return NOT_DONE_YET


class _TLSish(StringTransport):
    negotiatedProtocol = b"h2"


class Pair:
    def __init__(self, timeout: float = 3.0, validate: bool = True) -> None:
        self.resource = _Answer()
        site = HarpSite(self.resource, head_timeout=timeout)
        self.malformed: list[Request] = []
        site.on_malformed = self.malformed.append
        channel = site.buildProtocol(None)
        assert isinstance(channel, HarpChannel)
        self.clock = Clock()
        channel.clock = self.clock
        self.channel = channel
        self.transport = _TLSish()
        channel.makeConnection(self.transport)
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None,
                                      validate_outbound_headers=validate))
        self.client.initiate_connection()
        self.events: list[Any] = []
        self.flush()

    def flush(self) -> None:
        for _ in range(5):
            data = self.client.data_to_send()
            if data:
                self.channel.dataReceived(data)
            self.clock.advance(0)
            out = self.transport.value()
            self.transport.clear()
            if out:
                self.events += self.client.receive_data(out)

    def request(self, stream_id: int, path: bytes, end: bool = True,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self.client.send_headers(stream_id, [
            (b":method", b"POST" if not end else b"GET"), (b":scheme", b"https"),
            (b":authority", b"harp.test"), (b":path", path), *(extra or [])],
            end_stream=end)
        self.flush()

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def test_a_stream_is_processed_from_its_headers() -> None:
    pair = Pair()
    pair.request(1, b"/hold", end=False)
    [request] = pair.resource.seen  # before any body byte
    assert request.clientproto == b"HTTP/2"
    assert request.getHeader(b"host") == b"harp.test"
    assert request.has_body and not request.body_complete


def test_unread_body_closes_the_window() -> None:
    """Nobody reads the body (the upstream is slow): the client is held at the body
    pipe's WINDOW plus one HTTP/2 window, not allowed to push megabytes."""
    pair = Pair()
    pair.request(1, b"/hold", end=False)
    sent = 0
    while sent < 4 * WINDOW:
        room = min(pair.client.local_flow_control_window(1), 16384)
        if room <= 0:
            break
        pair.client.send_data(1, b"b" * room)
        sent += room
        pair.flush()
    assert WINDOW <= sent <= WINDOW + 2 * 65535
    [request] = pair.resource.seen
    assert request.body is not None and request.body._buffered <= sent


def test_slow_body_resets_the_stream_only() -> None:
    pair = Pair(timeout=3.0)
    pair.request(1, b"/hold", end=False)
    for _ in range(4):
        pair.clock.advance(1.0)
        if pair.of(h2.events.StreamReset):
            break
        pair.client.send_data(1, b"x")
        pair.flush()
    assert [e.stream_id for e in pair.of(h2.events.StreamReset)] == [1]
    assert pair.resource.seen[0]._disconnected
    assert not pair.transport.disconnecting


def test_early_answer_then_no_error_reset() -> None:
    pair = Pair()
    pair.request(1, b"/x", end=False)  # a body announced, none sent yet
    [response] = pair.of(h2.events.ResponseReceived)
    assert dict(response.headers)[b":status"] == b"403"
    assert b"connection" not in dict(response.headers)
    [reset] = pair.of(h2.events.StreamReset)
    assert reset.error_code == 0  # NO_ERROR: "stop sending, no harm done"
    pair.request(3, b"/x")  # the connection still serves
    assert len(pair.of(h2.events.ResponseReceived)) == 2


def test_host_disagreeing_with_authority_ends_the_connection() -> None:
    pair = Pair(validate=False)
    pair.request(1, b"/hold", extra=[(b"host", b"other.example")])
    assert not pair.resource.seen
    [goaway] = pair.of(h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_method_that_is_not_a_token_is_malformed() -> None:
    pair = Pair(validate=False)
    pair.client.send_headers(1, [
        (b":method", b"GET /admin"), (b":scheme", b"https"), (b":authority", b"h"),
        (b":path", b"/hold")], end_stream=True)
    pair.flush()
    assert not pair.resource.seen
    assert len(pair.malformed) == 1
    assert [e.stream_id for e in pair.of(h2.events.StreamReset)] == [1]


@pytest.mark.parametrize("value", [b"a\r\nx-injected: 1", b"a\nb", b"a\x00b"])
def test_line_breaks_in_a_field_end_the_connection(value: bytes) -> None:
    """They would split the HTTP/1.1 request sent upstream (the h2 package refuses them)."""
    pair = Pair(validate=False)
    pair.request(1, b"/hold", extra=[(b"x-test", value)])
    assert not pair.resource.seen
    [goaway] = pair.of(h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_rapid_reset_ends_the_connection() -> None:
    pair = Pair()
    for i in range(harp_h2.RESET_BURST + 10):
        stream_id = 1 + 2 * i
        pair.client.send_headers(stream_id, [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"h"),
            (b":path", b"/hold")])
        pair.client.reset_stream(stream_id)
    pair.flush()
    [goaway] = pair.of(h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert pair.transport.disconnecting
    assert len(pair.malformed) == 1  # one failure for the client's ban counter


def test_idle_connection_closes_after_the_client_timeout() -> None:
    pair = Pair(timeout=3.0)
    for _ in range(4):
        if pair.of(h2.events.ConnectionTerminated):
            break
        pair.client.ping(b"12345678")
        pair.flush()
        pair.clock.advance(1.0)
    pair.flush()
    goaways = pair.of(h2.events.ConnectionTerminated)
    assert goaways and all(g.error_code == 0 for g in goaways)
    assert pair.transport.disconnecting


def test_an_open_stream_suspends_the_idle_deadline() -> None:
    pair = Pair(timeout=3.0)
    pair.request(1, b"/hold")  # waits for its (upstream) answer: not idle
    pair.clock.advance(10.0)
    pair.flush()
    assert not pair.of(h2.events.ConnectionTerminated)
    assert not pair.transport.disconnecting
