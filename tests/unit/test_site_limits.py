"""HarpChannel/HarpRequest in memory: minimum body rate, early answers, and the steps
taken in twisted.web's place (request set-up, cookies, persistence) held to twisted.web's."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from harp.web.channel import HarpChannel
from harp.web.site import MIN_BODY_RATE, HarpRequest, HarpSite


class _Hold(Resource):
    """Answers nothing until told: the body keeps streaming meanwhile."""

    isLeaf = True

    def render(self, request: Request) -> int:  # type: ignore[override]
        return NOT_DONE_YET


class _EarlyAnswer(Resource):
    """Answers at once, before the body, as the pipeline does with a 4xx."""

    isLeaf = True

    def render(self, request: Request) -> int:  # type: ignore[override]
        assert isinstance(request, HarpRequest)
        request.close_early()
        request.setResponseCode(400)
        request.write(b"no")
        request.finish()
        return NOT_DONE_YET


def _connect(
    resource: Resource, timeout: float = 3.0, idle: float | None = None,
) -> tuple[HarpChannel, StringTransport, Clock]:
    """A channel of a HarpSite over an in-memory transport; ``idle``: the site's idle
    limit (twisted.web's default, 12 hours, otherwise)."""
    site = HarpSite(resource, head_timeout=timeout, **({} if idle is None else {"timeout": idle}))
    channel = site.buildProtocol(None)
    assert isinstance(channel, HarpChannel)
    clock = Clock()
    channel.clock = clock
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock


HEAD = b"POST /exapps/app/x HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n"


def test_trickling_body_is_cut_with_408() -> None:
    channel, transport, clock = _connect(_Hold())
    channel.dataReceived(HEAD + b"x")
    for _ in range(3):
        clock.advance(1.0)
        channel.dataReceived(b"x")
    assert transport.value().startswith(b"HTTP/1.1 408")
    assert transport.disconnecting


def test_body_at_a_fair_rate_is_not_cut() -> None:
    channel, transport, clock = _connect(_Hold())
    channel.dataReceived(HEAD)
    for _ in range(6):
        clock.advance(1.0)
        channel.dataReceived(b"x" * (2 * MIN_BODY_RATE))
    assert transport.value() == b"" and not transport.disconnecting


def test_rate_check_after_an_early_answer_is_harmless() -> None:
    channel, transport, clock = _connect(_EarlyAnswer())
    channel.dataReceived(HEAD + b"abc")
    assert transport.value().startswith(b"HTTP/1.1 400")
    # The rate timer must be gone, not fire on a finished request (it once raised
    # AttributeError there, logged as a traceback by the reactor).
    assert not any(
        call.func.__name__ == "_check_rate" for call in clock.getDelayedCalls()
    )
    clock.advance(10.0)


class _Answer(Resource):
    """Answers at once (a keep-alive connection then waits for its next request)."""

    isLeaf = True

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        return b"ok"


GET = b"GET /exapps/app/x HTTP/1.1\r\nHost: h\r\n\r\n"


def test_partial_head_gets_408_at_the_head_deadline() -> None:
    channel, transport, clock = _connect(_Hold())
    channel.dataReceived(b"GET /exapps/app/x HTTP/1.1\r\nHo")
    clock.advance(2.5)
    channel.dataReceived(b"st")  # bytes alone do not move the head deadline
    assert not transport.disconnecting
    clock.advance(0.75)  # 3 s and at most one tick (harp/deadlines.py)
    assert transport.value().startswith(b"HTTP/1.1 408")
    assert transport.disconnecting


def test_head_deadline_is_armed_again_for_each_request_of_a_connection() -> None:
    channel, transport, clock = _connect(_Answer())
    for _ in range(3):
        clock.advance(2.0)  # less than the deadline: no request yet, still open
        channel.dataReceived(GET)
        assert b"HTTP/1.1 200" in transport.value() and not transport.disconnecting
        transport.clear()
    clock.advance(3.25)  # idle after the third answer: closed quietly
    assert transport.value() == b"" and transport.disconnecting


def test_idle_limit_moves_with_every_byte_and_is_off_while_a_request_runs() -> None:
    channel, transport, clock = _connect(_Hold(), timeout=0)  # no head deadline
    channel.setTimeout(2)
    clock.advance(1.5)
    channel.dataReceived(b"GET /exapps/app/x HTTP/1.1\r\n")
    clock.advance(1.5)  # 3 s since connecting, 1.5 s since the last byte
    assert not transport.disconnecting
    channel.dataReceived(b"Host: h\r\n\r\n")  # a request runs: no idle limit
    clock.advance(30)
    assert not transport.disconnecting
    channel.requests[-1].finish()  # its answer is done: idle again
    clock.advance(2.25)
    assert transport.disconnecting


def test_a_request_is_set_up_as_twisted_web_sets_one_up() -> None:
    # HarpRequest.__init__ replaces twisted.web's three chained ones: the same attributes
    # with the same values, or a Twisted upgrade that adds one fails here, not in use.
    channel, _, _ = _connect(_Hold())
    ours = HarpRequest(channel, 0)
    twisted_web = Request(channel, 0)
    assert sorted(vars(ours)) == sorted(vars(twisted_web))
    for name, value in vars(twisted_web).items():
        mine = vars(ours)[name]
        if name.endswith("Headers"):
            assert list(mine.getAllRawHeaders()) == list(value.getAllRawHeaders()) == []
        else:
            assert mine == value, name
    assert ours.requestHeaders is not ours.responseHeaders
    assert HarpRequest(channel, queued=False).queued is False  # as HTTP/2 passes it


# HarpChannel.allHeadersReceived takes twisted.web's steps with HaRP's header look-ups:
# the cookie parse and the persistence rule must decide exactly as twisted.web's do.

_HEADER_BYTES = st.binary(max_size=40).map(
    lambda raw: raw.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_HEADER_BYTES | st.sampled_from(
    [b"a=1; b=2", b"a=1;a=2", b" x = y ;z", b"=v", b"novalue", b"", b";;", b"k=v=w"]
), max_size=3))
def test_cookies_are_parsed_as_twisted_web_parses_them(values: list[bytes]) -> None:
    channel, _, _ = _connect(_Hold())
    ours, theirs = HarpRequest(channel, 0), Request(channel, 0)
    for request in (ours, theirs):
        if values:
            request.requestHeaders.setRawHeaders(b"Cookie", values)
    ours.parseCookies()
    http.Request.parseCookies(theirs)
    assert ours.received_cookies == theirs.received_cookies


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(_HEADER_BYTES | st.sampled_from(
        [b"close", b"Close", b"keep-alive", b"keep-alive, close", b"close, keep-alive",
         b"upgrade close", b"CLOSE"]
    ), max_size=2),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9"]),
)
def test_persistence_is_decided_as_twisted_web_decides(values: list[bytes], version: bytes) -> None:
    channel, _, _ = _connect(_Hold())
    ours, theirs = HarpRequest(channel, 0), Request(channel, 0)
    for request in (ours, theirs):
        if values:
            request.requestHeaders.setRawHeaders(b"Connection", values)
    assert channel._persists(ours, ours.requestHeaders, version) == (
        http.HTTPChannel.checkPersistence(channel, theirs, version)
    )
    assert list(ours.responseHeaders.getAllRawHeaders()) == list(
        theirs.responseHeaders.getAllRawHeaders()
    )
