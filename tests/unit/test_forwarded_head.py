"""What reaches the ExApp of a request's headers, remembered by the header bytes.

Why: the forwarded header lines are a pure function of the header bytes as received
(harp/web/proxy.py, ``_FORWARDED``), so a client that sends the same headers again gets
them from memory.  These tests require the remembered answer to be exactly what the
headers give when worked out afresh: hop-by-hop and Connection-listed headers dropped,
HaRP's own headers never passed on, and a head parsed line by line (split across reads)
giving the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harp.web import proxy
from tests.unit.test_request_lifetime import Stack

HEAD = (
    b"GET /exapps/app/x?q=1 HTTP/1.1\r\nHost: harp.example\r\nConnection: keep-alive, X-Drop\r\n"
    b"X-Drop: 1\r\nharp-shared-key: secret\r\nAccept: */*\r\nAccept: text/html\r\n\r\n"
)


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    proxy._FORWARDED.clear()
    yield Stack(monkeypatch)


def _sent_upstream(stack: Stack, *pieces: bytes) -> bytes:
    channel, transport = stack.client()
    for piece in pieces:
        channel.dataReceived(piece)
    if stack.upstream is None:
        factory = stack.clock.tcpClients[-1][2]
        stack.upstream = factory.buildProtocol(None)
        stack.upstream.makeConnection(stack.upstream_transport)
    sent = stack.upstream_transport.value()
    stack.answer()
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    return sent


def test_remembered_lines_are_those_worked_out_afresh(stack: Stack) -> None:
    first = _sent_upstream(stack, HEAD)
    assert len(proxy._FORWARDED) == 1
    second = _sent_upstream(stack, HEAD)
    # Split across reads: parsed line by line, nothing remembered is used.
    split = _sent_upstream(stack, HEAD[:40], HEAD[40:])
    assert first == second == split
    head = first.split(b"\r\n\r\n")[0]
    assert head.startswith(b"GET /x?q=1 HTTP/1.1\r\n")
    assert b"Host: harp.example" in head
    assert b"Accept: */*\r\nAccept: text/html" in head
    lower = head.lower()
    assert b"x-drop" not in lower and b"harp-shared-key" not in lower
    assert b"connection: keep-alive" not in lower  # HaRP's own upstream connection header
    assert b"ex-app-id: app" in lower


def test_other_header_bytes_are_worked_out_on_their_own(stack: Stack) -> None:
    first = _sent_upstream(stack, HEAD)
    other = _sent_upstream(stack, HEAD.replace(b"X-Drop: 1", b"X-Keep: 1"))
    assert b"X-Keep: 1" in other and b"X-Keep" not in first
    assert len(proxy._FORWARDED) == 2


def test_remembered_blocks_are_bounded(stack: Stack) -> None:
    # The bound itself, not a patched one: compiled (harp/compiled.py), a Final is a constant.
    for n in range(proxy._MAX_REMEMBERED_BLOCKS + 3):
        _sent_upstream(stack, HEAD.replace(b"X-Drop: 1", b"X-N: %d" % n))
        assert len(proxy._FORWARDED) <= proxy._MAX_REMEMBERED_BLOCKS
    big = HEAD.replace(b"X-Drop: 1", b"X-Big: " + b"b" * proxy._MAX_REMEMBERED_BLOCK)
    proxy._FORWARDED.clear()
    assert b"X-Big: bbb" in _sent_upstream(stack, big)
    assert not proxy._FORWARDED


def test_the_docker_secrets_stay_behind_whichever_route_saw_the_bytes_first() -> None:
    # One header block, remembered for the ExApp route (Authorization and Cookie pass)
    # and for the Docker passthrough (HaRP's secrets never reach an engine): two entries.
    from twisted.web.http_headers import Headers

    from harp.docker.passthrough import _SECRET_HEADERS

    block = (b"Host: x\r\nAuthorization: Basic c2VjcmV0\r\nCookie: a=b\r\n"
             b"harp-shared-key: k\r\ndocker-engine-port: 24001\r\nAccept: */*")

    class Parsed:
        header_block = block
        requestHeaders = Headers()

    for line in block.split(b"\r\n"):
        name, _, value = line.partition(b": ")
        Parsed.requestHeaders.addRawHeader(name, value)
    proxy._FORWARDED.clear()
    for order in ((frozenset(), _SECRET_HEADERS), (_SECRET_HEADERS, frozenset())):
        proxy._FORWARDED.clear()
        answers = {drop: proxy._forwarded_headers(Parsed, b"e:1", drop)  # type: ignore[arg-type]
                   for drop in order}
        assert len(proxy._FORWARDED) == 2
        docker = answers[_SECRET_HEADERS].lower()
        for secret in (b"authorization", b"cookie", b"harp-shared-key", b"docker-engine-port"):
            assert secret not in docker
        assert b"accept: */*" in docker and b"host: x" in docker
        exapp = answers[frozenset()].lower()
        assert b"authorization: basic" in exapp and b"cookie: a=b" in exapp
        assert b"harp-shared-key" not in exapp
