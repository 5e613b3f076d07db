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

from harp.web.site import HarpSite
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


def _feed(data: bytes, chunk: int) -> tuple[_Record, StringTransport]:
    resource = _Record()
    site = HarpSite(resource, head_timeout=30.0)
    channel = site.buildProtocol(None)
    channel.clock = Clock()
    transport = StringTransport()
    channel.makeConnection(transport)
    for i in range(0, len(data), chunk):
        channel.dataReceived(data[i : i + chunk])
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
