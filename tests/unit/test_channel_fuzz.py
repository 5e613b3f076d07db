"""Hypothesis-driven fuzzing of the HTTP request head handling (HarpChannel/HarpRequest).

Random and mutated request heads are fed to a real channel over an in-memory transport:
whatever arrives, the channel must never raise, must answer at most with a well-formed
status line, and a request that reaches the resource must carry an origin-form target
or be refused by the pipeline's target check.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from harp.web.site import HarpChannel, HarpSite
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


def _connected(resource: Resource) -> tuple[HarpChannel, StringTransport]:
    """A real channel of a HarpSite serving ``resource``, over an in-memory transport."""
    channel = HarpSite(resource, head_timeout=30.0).buildProtocol(None)
    assert isinstance(channel, HarpChannel)
    channel.clock = Clock()
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def _deliver(channel: HarpChannel, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
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


# --- the one-pass head path (HarpChannel._whole_head) against the line-by-line one


class _Echo(Resource):
    """Records what each request looked like and answers it at once."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, bytes, list[tuple[bytes, list[bytes]]]]] = []

    def render(self, request: Request) -> int:  # type: ignore[override]
        headers = sorted(request.requestHeaders.getAllRawHeaders())
        self.seen.append((request.method, request.uri, request.clientproto, headers))
        request.setResponseCode(200)
        request.setHeader(b"content-length", b"2")
        request.write(b"ok")
        request.finish()
        return NOT_DONE_YET


def _outcome(data: bytes, chunk: int) -> tuple[object, ...]:
    resource = _Echo()
    channel, transport = _connected(resource)
    whole_heads = 0
    original = channel._head_received

    def counted(lines: list[bytes], block: bytes) -> None:
        nonlocal whole_heads
        whole_heads += 1
        original(lines, block)

    channel._head_received = counted  # type: ignore[method-assign]
    _deliver(channel, data, chunk)
    written = b"\r\n".join(
        line for line in transport.value().split(b"\r\n") if not line.startswith(b"Date: ")
    )
    return (resource.seen, written, transport.disconnecting, len(channel.requests)), whole_heads


_ODD_HEADERS = st.sampled_from([
    b"Host: h", b"X-A: 1", b"x-a: 2", b"X-Empty:", b" folded", b"\tfolded", b"Bad Name: x",
    b"NoColon", b": novalue", b"X-Nul: a\x00b", b"X-Cr: a\rb", b"X-Lf: a\nb",
    b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: 5, 5",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Connection: close",
    b"Cookie: a=b; c=d", b"X-Spaces:   padded   ", b"X" * 300 + b": long",
])


#: Mostly well-formed request lines, so that the headers decide what happens.
_GOOD_METHODS = st.one_of(st.sampled_from([b"GET", b"POST", b"HEAD", b"DELETE"]), _METHODS)
_GOOD_TARGETS = st.one_of(st.sampled_from([b"/exapps/app/x", b"/exapps/app/a?b=c"]), _TARGETS)
_GOOD_VERSIONS = st.one_of(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]), _VERSIONS)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _GOOD_METHODS, _GOOD_TARGETS, _GOOD_VERSIONS,
    st.lists(st.one_of(_ODD_HEADERS, st.binary(max_size=20)), max_size=8),
    st.binary(max_size=12), st.booleans(), st.booleans(),
)
def test_one_pass_head_and_line_by_line_agree(
    method: bytes, target: bytes, version: bytes, headers: list[bytes], body: bytes,
    pipelined: bool, leading_blank: bool,
) -> None:
    head = method + b" " + target + b" " + version + b"\r\n"
    if headers:
        head += b"\r\n".join(headers) + b"\r\n"
    data = (b"\r\n" if leading_blank else b"") + head + b"\r\n" + body
    if pipelined:
        data += b"GET /exapps/app/next HTTP/1.1\r\nHost: h\r\n\r\n"
    whole, _ = _outcome(data, len(data))
    by_byte, whole_heads = _outcome(data, 1)
    assert whole_heads == 0  # byte by byte never takes the one-pass path
    assert whole == by_byte


def test_the_one_pass_path_is_taken_for_an_ordinary_head() -> None:
    data = b"GET /exapps/app/x?q=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
    (seen, written, closing, _), whole_heads = _outcome(data + data, len(data) * 2)
    assert whole_heads == 1  # the second (pipelined) head waited in the buffer
    assert len(seen) == 2 and seen[0][1] == b"/exapps/app/x?q=1"
    assert dict(seen[0][3])[b"X-A"] == [b"1", b"2"]
    assert written.count(b"HTTP/1.1 200") == 2 and not closing


def test_too_many_headers_are_refused_both_ways() -> None:
    lines = b"".join(b"X-%d: v\r\n" % n for n in range(501))  # twisted.web allows 500
    data = b"GET /exapps/app/x HTTP/1.1\r\n" + lines + b"\r\n"
    assert len(data) < 8192  # within reach of the one-pass path
    whole, whole_heads = _outcome(data, len(data))
    by_byte, _ = _outcome(data, 1)
    assert whole_heads == 1 and whole == by_byte
    seen, written, closing, _ = whole  # type: ignore[misc]
    assert seen == [] and written == b"" and closing
