"""HaRP's HTTP/1.x channel in memory: its states, time limits and back-pressure.

What a head may be is held to twisted.web's by tests/unit/test_channel_fuzz.py; these
are the parts of a connection's life around it.
"""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from harp.web import channel as channel_module
from harp.web.channel import EAGER_READ, HarpChannel, lines_within_limits, unfold
from tests.unit.test_site_limits import _connect as connect


class _Held(Resource):
    """Keeps every request unanswered until the test answers it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render(self, request: Request) -> int:  # type: ignore[override]
        self.held.append(request)
        return NOT_DONE_YET


def _answer(request: Request) -> None:
    request.setHeader(b"content-length", b"2")
    request.write(b"ok")
    request.finish()


def _connect(resource: Resource) -> tuple[HarpChannel, StringTransport, Clock, list[Request]]:
    """A channel with a 3 s head deadline and a 10 s idle limit, and the requests its
    site was told were malformed."""
    channel, transport, clock = connect(resource, timeout=3.0, idle=10.0)
    malformed: list[Request] = []
    channel.site.on_malformed = malformed.append
    return channel, transport, clock, malformed


def _one_request() -> tuple[HarpChannel, StringTransport, Clock, Request]:
    """A channel whose one GET is held unanswered."""
    resource = _Held()
    channel, transport, clock, _ = _connect(resource)
    channel.dataReceived(GET)
    return channel, transport, clock, resource.held[0]


GET = b"GET /exapps/app/x HTTP/1.1\r\nHost: h\r\n\r\n"


def test_a_started_request_line_times_out_with_408() -> None:
    channel, transport, clock, _ = _connect(_Held())
    channel.dataReceived(b"GET /exapps/app/x HTTP/1.1\r\nHost: h")
    clock.advance(3.5)
    assert transport.value().startswith(b"HTTP/1.1 408") and transport.disconnecting


def test_bytes_that_never_made_a_request_line_are_closed_quietly() -> None:
    channel, transport, clock, _ = _connect(_Held())
    channel.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)
    clock.advance(3.5)
    assert transport.value() == b"" and transport.disconnecting


def test_an_idle_keep_alive_connection_is_closed_quietly() -> None:
    _, transport, clock, request = _one_request()
    _answer(request)
    transport.clear()
    clock.advance(3.5)
    assert transport.value() == b"" and transport.disconnecting


def test_no_idle_limit_while_an_answer_is_prepared() -> None:
    _, transport, clock, request = _one_request()
    for _ in range(30):
        clock.advance(1.0)
    assert not transport.disconnecting
    _answer(request)
    assert transport.value().startswith(b"HTTP/1.1 200")


def test_pipelined_requests_wait_and_past_the_eager_limit_reading_pauses() -> None:
    resource = _Held()
    channel, transport, _, _ = _connect(resource)
    channel.dataReceived(GET)
    channel.dataReceived(GET * (EAGER_READ // len(GET)))
    assert transport.producerState == "producing"
    channel.dataReceived(GET * 2)
    assert transport.producerState == "paused"
    assert len(resource.held) == 1
    _answer(resource.held[0])
    # Answered: the next waiting request is parsed (and held); what still waits is more
    # than the limit, so reading stays paused until enough are answered.
    assert len(resource.held) == 2
    while transport.producerState == "paused":
        _answer(resource.held[-1])
    assert len(channel.buffer) <= EAGER_READ


def test_a_full_client_pauses_the_answer_not_the_reading_of_its_request() -> None:
    channel, transport, _, request = _one_request()

    class Producer:
        paused = False

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            self.paused = False

        def stopProducing(self) -> None:
            pass

    producer = Producer()
    request.registerProducer(producer, True)
    channel.pauseProducing()  # as the transport does when its buffer is full
    assert producer.paused and transport.producerState == "producing"
    channel.resumeProducing()
    assert not producer.paused


def test_a_full_client_between_requests_stops_reading() -> None:
    resource = _Held()
    channel, transport, _, _ = _connect(resource)
    channel.pauseProducing()
    assert transport.producerState == "paused"
    channel.resumeProducing()
    assert transport.producerState == "producing"


def test_an_over_long_line_counts_as_malformed() -> None:
    channel, transport, _, malformed = _connect(_Held())
    channel.dataReceived(b"GET /exapps/app/x HTTP/1.1\r\nX-Long: " + b"a" * 17000)
    assert transport.value() == b"" and transport.disconnecting
    assert len(malformed) == 1


def test_a_body_split_across_reads_then_the_next_request() -> None:
    resource = _Held()
    channel, _, _, _ = _connect(resource)
    channel.dataReceived(b"POST /exapps/app/x HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")
    channel.dataReceived(b"cde" + GET)
    first = resource.held[0]
    assert first.body is not None and first.body_complete  # type: ignore[attr-defined]
    _answer(first)
    assert len(resource.held) == 2 and resource.held[1].method == b"GET"


def test_unfold_joins_continuations_as_twisted_web_does() -> None:
    assert unfold([b"A: 1", b" more", b"\tand", b"B: 2"]) == [b"A: 1 more and", b"B: 2"]
    assert unfold([b" lone", b"B: 2"]) == [b" lone", b"B: 2"]


def test_head_limits() -> None:
    assert lines_within_limits([b"a" * 16384], 0)
    assert not lines_within_limits([b"a" * 16385], 0)
    assert not lines_within_limits([b"a" * 9000, b"b" * 9000], 0)
    assert not lines_within_limits([b"a"], 16385)
    assert channel_module.MAX_HEAD == channel_module.MAX_LINE == 16384


def test_finish_keeps_twisted_webs_steps() -> None:
    """HarpRequest's one-call finish: the same outcome as twisted.web's three calls."""
    channel, transport, _, request = _one_request()
    done = request.notifyFinish()
    fired: list[object] = []
    done.addCallback(fired.append)
    request.finish()  # nothing written yet: the head goes first
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert fired == [None] and request.finished and not channel.requests
    with pytest.warns(UserWarning, match="finish called twice"):
        request.finish()


def test_finish_after_the_connection_was_lost_is_refused() -> None:
    channel, _, _, request = _one_request()
    channel.connectionLost(Failure(ConnectionDone()))
    with pytest.raises(RuntimeError, match="connection was lost"):
        request.finish()


def test_a_chunked_answer_is_ended() -> None:
    _, transport, _, request = _one_request()
    request.write(b"abc")  # no length: chunked
    request.finish()
    assert transport.value().endswith(b"3\r\nabc\r\n0\r\n\r\n")


def test_a_trickled_oversized_head_is_dropped_within_a_bound() -> None:
    """Many short header lines, one byte per read: dropped once the lines' total passes
    the limit, at most ``CHECK_EVERY`` bytes later — never buffered without end."""
    channel, transport, _, malformed = _connect(_Held())
    data = b"GET /exapps/app/x HTTP/1.1\r\n" + b"X: y\r\n" * 10000
    fed = 0
    for byte in data:
        channel.dataReceived(bytes([byte]))
        fed += 1
        if transport.disconnecting:
            break
    assert transport.disconnecting and malformed and transport.value() == b""
    # 16 384 bytes of lines are ≈ 24.6 KB with their CRLFs; one check step later at most.
    assert fed <= 16384 * 6 // 4 + 64 + channel_module.CHECK_EVERY
