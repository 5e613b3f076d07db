"""Hypothesis-driven fuzzing of the HTTP request head handling (HarpChannel/HarpRequest).

Random and mutated request heads are fed to a real channel over an in-memory transport:
whatever arrives, the channel must never raise, must answer at most with a well-formed
status line, and a request that reaches the resource must carry an origin-form target
or be refused by the pipeline's target check.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from harp.web.channel import HarpChannel
from harp.web.site import HarpRequest, HarpSite
from harp.web.target import normalise_path, valid_target


class _Record(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def render(self, request: Request) -> int:  # type: ignore[override]
        self.seen.append(request.uri)
        if valid_target(request.uri):
            normalise_path(request.path)  # must not raise either
        request.setResponseCode(204)
        request.finish()
        return NOT_DONE_YET


def _connected(
    resource: Resource, request_factory: type[HarpRequest] = HarpRequest,
) -> tuple[HarpChannel, StringTransport]:
    """A real channel of a HarpSite serving ``resource``, over an in-memory transport."""
    site = HarpSite(resource, head_timeout=30.0)
    site.requestFactory = request_factory
    channel = site.buildProtocol(None)
    assert isinstance(channel, HarpChannel)
    channel.clock = Clock()
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def _deliver(channel: HarpChannel, data: bytes, chunk: int, transport: Any = None) -> None:
    transport = transport or channel.transport
    for i in range(0, len(data), chunk):
        if transport.disconnecting:
            break  # a closing connection is not read any more (Twisted stops reading)
        channel.dataReceived(data[i : i + chunk])


def _feed(data: bytes, chunk: int) -> tuple[_Record, StringTransport]:
    resource = _Record()
    channel, transport = _connected(resource)
    _deliver(channel, data, chunk)
    channel.connectionLost(Exception("done"))  # type: ignore[arg-type]
    return resource, transport


_METHODS = st.sampled_from([b"GET", b"POST", b"PUT", b"G\x00T", b"", b"OPTIONS"])
_TARGETS = st.one_of(
    st.binary(max_size=30),
    st.sampled_from([b"/exapps/app/x", b"*", b"0/exapps/a", b"http://h/x", b"/a%zz", b"/%2e%2e"]),
)
_VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"", b"HTTP/1.1 x"])
_HEADERS = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([
            b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity", b"Content-Length: 5",
            b"Content-Length: -1", b"Connection: Upgrade", b"Upgrade: websocket",
            b"Expect: 100-continue",
        ]),
    ),
    max_size=6,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_METHODS, _TARGETS, _VERSIONS, _HEADERS, st.binary(max_size=40), st.integers(1, 64))
def test_request_heads_never_break_the_channel(
    method: bytes, target: bytes, version: bytes, headers: list[bytes], body: bytes, chunk: int
) -> None:
    data = method + b" " + target + b" " + version + b"\r\n" + b"\r\n".join(headers)
    data += b"\r\n\r\n" + body
    _, transport = _feed(data, chunk)
    written = transport.value()
    assert written == b"" or written.startswith(b"HTTP/1.")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 64))
def test_random_bytes_never_break_the_channel(data: bytes, chunk: int) -> None:
    _, transport = _feed(data, chunk)
    written = transport.value()
    assert written == b"" or written.startswith(b"HTTP/1.")


# --- HaRP's channel against twisted.web's, for the same bytes


class _Echo(Resource):
    """Records what each request looked like and answers it at once."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, bytes, list[tuple[bytes, list[bytes]]]]] = []

    def render(self, request: Request) -> int:  # type: ignore[override]
        if isinstance(request, _AnsweredWhenComplete) and request.has_body:
            # HaRP processes a request from its head on, twisted.web once its body is
            # in: answered at the same point, both see the same requests.
            request.pending = lambda: self._answer(request)
        else:
            self._answer(request)
        return NOT_DONE_YET

    def _answer(self, request: Request) -> None:
        headers = sorted(request.requestHeaders.getAllRawHeaders())
        self.seen.append((request.method, request.uri, request.clientproto, headers))
        request.setResponseCode(200)
        request.setHeader(b"content-length", b"2")
        request.write(b"ok")
        request.finish()


class _AnsweredWhenComplete(HarpRequest):
    """HaRP's request, answered by :class:`_Echo` once its body is complete."""

    pending: Callable[[], None] | None = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        super().requestReceived(command, path, version)
        pending, self.pending = self.pending, None
        if pending is not None:
            pending()


def _statuses(written: bytes) -> list[bytes]:
    """The status lines written, without twisted.web's own ``400`` (where HaRP drops
    the connection without an answer, docs/security.md)."""
    return [
        line for line in re.findall(rb"HTTP/1\.[01] \d{3} [^\r]*", written)
        if line != b"HTTP/1.1 400 Bad Request"
    ]


def _harp_outcome(data: bytes, chunk: int) -> tuple[object, ...]:
    resource = _Echo()
    channel, transport = _connected(resource, _AnsweredWhenComplete)
    _deliver(channel, data, chunk)
    return resource.seen, _statuses(transport.value()), transport.disconnecting


class _TwistedRequest(Request):
    """twisted.web's request, processed as HaRP's is: the one resource renders every
    request target (twisted.web's site answers ``*`` itself)."""

    def process(self) -> None:
        self.site = self.channel.site
        self.prepath, self.postpath = [], []
        self.render(self.site.resource)


class _ClosingTransport(StringTransport):
    """twisted.web's channel resumes reading a transport it closed (harmless on a real
    one, refused by ``StringTransport``)."""

    def _checkState(self) -> None:
        pass

    def unregisterProducer(self) -> None:
        self.producer = None


def _twisted_outcome(data: bytes, chunk: int) -> tuple[object, ...]:
    resource = _Echo()
    site = Site(resource, reactor=Clock())
    site.requestFactory = _TwistedRequest
    channel = site.buildProtocol(None)
    transport = _ClosingTransport()
    channel.makeConnection(transport)
    try:
        _deliver(channel, data, chunk, transport)  # type: ignore[arg-type]
        # twisted.web leaves a request pipelined after a body unparsed until more bytes
        # come (its parser was busy when it was handed back); HaRP parses it at once.
        if not transport.disconnecting:
            channel.dataReceived(b"")
    except AttributeError:
        # twisted.web goes on parsing lines after it refused a head, and may then trip
        # over its own missing request line: the connection is being closed anyway.
        assert transport.disconnecting
    return resource.seen, _statuses(transport.value()), transport.disconnecting


_ODD_HEADERS = st.sampled_from([
    b"Host: h", b"X-A: 1", b"x-a: 2", b"X-Empty:", b" folded", b"\tfolded", b"Bad Name: x",
    b"NoColon", b": novalue", b"X-Nul: a\x00b", b"X-Cr: a\rb", b"X-Lf: a\nb",
    b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: 5, 5", b"Content-Length: +5",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: Chunked", b"Transfer-Encoding: gzip",
    b"Connection: close", b"Connection: keep-alive, close", b"Expect: 100-continue",
    b"Cookie: a=b; c=d", b"X-Spaces:   padded   ", b"X" * 300 + b": long",
])


#: Mostly well-formed request lines, so that the headers decide what happens.
_GOOD_METHODS = st.one_of(st.sampled_from([b"GET", b"POST", b"HEAD", b"DELETE"]), _METHODS)
_GOOD_TARGETS = st.one_of(st.sampled_from([b"/exapps/app/x", b"/exapps/app/a?b=c"]), _TARGETS)
_GOOD_VERSIONS = st.one_of(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]), _VERSIONS)


def _body_for(headers: list[bytes]) -> bytes:
    """A body that completes the framing the headers declare (when they declare one)."""
    for line in headers:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length" and value.strip().isdigit():
            return b"b" * int(value)
        if name.lower() == b"transfer-encoding" and value.strip().lower() == b"chunked":
            return b"3\r\nabc\r\n0\r\n\r\n"
    return b""


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _GOOD_METHODS, _GOOD_TARGETS, _GOOD_VERSIONS,
    st.lists(st.one_of(_ODD_HEADERS, st.binary(max_size=20)), max_size=8),
    st.integers(0, 2), st.booleans(), st.booleans(), st.integers(1, 64),
)
def test_harp_and_twisted_web_agree_on_heads(
    method: bytes, target: bytes, version: bytes, headers: list[bytes], pipelined: int,
    leading_blank: bool, whole: bool, chunk: int,
) -> None:
    """Same bytes, same requests seen, same answers, same close — except that where
    twisted.web answers 400, HaRP drops silently (mapped out by :func:`_statuses`).

    Only a request's declared ``Transfer-Encoding`` other than ``chunked`` is treated
    differently on purpose (HaRP refuses ``identity`` too), so none is generated.
    """
    head = method + b" " + target + b" " + version + b"\r\n"
    if headers:
        head += b"\r\n".join(headers) + b"\r\n"
    data = (b"\r\n" if leading_blank else b"") + head + b"\r\n" + _body_for(headers)
    data += b"GET /exapps/app/next HTTP/1.1\r\nHost: h\r\n\r\n" * pipelined
    size = len(data) if whole else chunk
    assert _harp_outcome(data, size) == _twisted_outcome(data, size)


def test_pipelined_heads_are_answered_in_order() -> None:
    data = b"GET /exapps/app/x?q=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
    seen, statuses, closing = _harp_outcome(data + data, len(data) * 2)
    assert isinstance(seen, list) and len(seen) == 2 and seen[0][1] == b"/exapps/app/x?q=1"
    assert dict(seen[0][3])[b"X-A"] == [b"1", b"2"]
    assert statuses == [b"HTTP/1.1 200 OK"] * 2 and not closing


def test_too_many_headers_are_refused() -> None:
    lines = b"".join(b"X-%d: v\r\n" % n for n in range(501))  # twisted.web allows 500
    data = b"GET /exapps/app/x HTTP/1.1\r\n" + lines + b"\r\n"
    assert _harp_outcome(data, len(data)) == ([], [], True)
    assert _harp_outcome(data, 7) == _twisted_outcome(data, 7)


def test_over_long_lines_and_heads_are_refused() -> None:
    long_line = b"GET /exapps/app/x HTTP/1.1\r\nX-Long: " + b"a" * 16400 + b"\r\n\r\n"
    many_lines = b"GET /exapps/app/x HTTP/1.1\r\n" + b"X-L: " + b"a" * 8000 + b"\r\n"
    many_lines = many_lines + b"X-M: " + b"a" * 8000 + b"\r\nX-N: " + b"a" * 500 + b"\r\n\r\n"
    for data in (long_line, many_lines, long_line[:-4], b"G" * 20000):
        for chunk in (len(data), 1000):
            assert _harp_outcome(data, chunk) == ([], [], True)
            assert _twisted_outcome(data, chunk) == ([], [], True)
