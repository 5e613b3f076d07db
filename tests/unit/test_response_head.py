"""The upstream response-head parser used by the upgrade path."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.web.response_head import BadResponse, body_framing, parse_response_head


def test_101_with_rest() -> None:
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    parsed = parse_response_head(raw + b"\x81\x00")
    assert parsed is not None
    head, rest = parsed
    assert head.status == 101 and head.raw == raw and rest == b"\x81\x00"
    assert head.tokens(b"upgrade") == {b"websocket"}


def test_incomplete() -> None:
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nA: b\r\n") is None


@pytest.mark.parametrize(
    "raw",
    [b"HTTP/2 200 OK\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nbad\r\n\r\n",
     b"HTTP/1.1 200 OK\r\n a: b\r\n\r\n", b"x" * 70000,
     # Header values are relayed as they are: no bare CR or LF, no NUL, names are tokens.
     b"HTTP/1.1 200 OK\r\nA: b\nInjected: 1\r\n\r\n", b"HTTP/1.1 200 OK\r\nA: b\rc\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nA: b\x00\r\n\r\n", b"HTTP/1.1 200 OK\r\nA(b): c\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nA\tb: c\r\n\r\n", b"HTTP/1.1 200 OK\nA: b\r\n\r\n"],
)
def test_bad(raw: bytes) -> None:
    with pytest.raises(BadResponse):
        parse_response_head(raw)


@pytest.mark.parametrize(
    ("head", "method", "framing"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"GET", ("length", 5)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET", ("chunked", 0)),
        (b"HTTP/1.1 200 OK\r\n\r\n", b"GET", ("close", 0)),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"GET", ("none", 0)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD", ("none", 0)),
    ],
)
def test_framing(head: bytes, method: bytes, framing: tuple[str, int]) -> None:
    parsed = parse_response_head(head)
    assert parsed is not None
    assert body_framing(parsed[0], method) == framing


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"],
)
def test_ambiguous_framing(head: bytes) -> None:
    parsed = parse_response_head(head)
    assert parsed is not None
    with pytest.raises(BadResponse):
        body_framing(parsed[0], b"GET")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_only_bad_response(data: bytes) -> None:
    try:
        parsed = parse_response_head(b"HTTP/1.1 200 OK\r\n" + data)
        if parsed is not None:
            body_framing(parsed[0], b"GET")
    except BadResponse:
        pass


# --- remembered heads (the same bytes, answer after answer, are parsed once)


def test_same_bytes_give_the_same_head_and_the_rest_is_each_responses_own() -> None:
    raw = b"HTTP/1.1 200 OK\r\nServer: up\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n"
    first = parse_response_head(raw + b"ok")
    second = parse_response_head(raw + b"OK")
    assert first is not None and second is not None
    assert first[0] is second[0]
    assert (first[1], second[1]) == (b"ok", b"OK")
    assert body_framing(second[0], b"GET") == ("length", 2)
    assert body_framing(second[0], b"HEAD") == ("none", 0)  # the method still counts
    assert second[0].end_to_end() == [(b"server", b"up"), (b"content-length", b"2")]


def test_a_remembered_head_with_a_bad_framing_is_refused_every_time() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
    for _ in range(3):
        parsed = parse_response_head(raw)
        assert parsed is not None
        with pytest.raises(BadResponse, match="conflicting content-length"):
            body_framing(parsed[0], b"GET")


def test_a_bad_head_is_refused_every_time() -> None:
    for _ in range(3):
        with pytest.raises(BadResponse):
            parse_response_head(b"HTTP/1.1 200 OK\r\nA: b\x00\r\n\r\n")


def test_connection_listed_and_hop_by_hop_headers_are_not_relayed() -> None:
    parsed = parse_response_head(
        b"HTTP/1.1 200 OK\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: t=5\r\n"
        b"Transfer-Encoding: chunked\r\nX-Kept: 2\r\n\r\n"
    )
    assert parsed is not None
    head = parsed[0]
    assert head.connection_tokens() == {b"close", b"x-secret"}
    assert head.end_to_end() == [(b"x-kept", b"2")]


def test_heads_are_remembered_within_bounds() -> None:
    from harp.web import response_head as module

    for n in range(module._MAX_REMEMBERED_HEADS * 2):
        parse_response_head(b"HTTP/1.1 200 OK\r\nX-N: %d\r\n\r\n" % n)
    assert len(module._HEADS) <= module._MAX_REMEMBERED_HEADS
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * module._MAX_REMEMBERED_HEAD + b"\r\n\r\n"
    parse_response_head(big)
    assert big not in module._HEADS
