"""Where an upstream's answer body ends, whatever the reads it arrives in.

Why: the pooled exchange and a refused WebSocket upgrade both rely on
:class:`harp.web.response_body.ResponseBody` to stop at the body's end — bytes past it
would otherwise be taken for the body, or a truncated body for a complete one.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harp.web.response_body import ResponseBody
from harp.web.response_head import BadResponse


def _read(framing: str, remaining: int, parts: list[bytes]) -> tuple[bytes, list[bytes]]:
    data: list[bytes] = []
    done: list[bytes] = []
    body = ResponseBody(data.append, done.append)
    body.start(framing, remaining)
    for part in parts:
        if done:
            break  # never fed after the end
        body.feed(part)
    assert all(data)  # no empty pieces
    return b"".join(data), done


def _splits(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in pairwise(points)]


@given(st.binary(max_size=200), st.binary(max_size=20), st.lists(st.integers(0, 240), max_size=6))
def test_length_body_ends_after_its_bytes_in_any_split(
    payload: bytes, extra: bytes, cuts: list[int]
) -> None:
    got, done = _read("length", len(payload), _splits(payload + extra, cuts) or [b""])
    assert got == payload
    if payload or extra:
        # Ended once, and what came after the body is the start of ``extra``.
        assert len(done) == 1 and extra.startswith(done[0])


@given(st.lists(st.binary(min_size=1, max_size=50), max_size=5), st.binary(max_size=10),
       st.lists(st.integers(0, 300), max_size=6))
def test_chunked_body_in_any_split(chunks: list[bytes], extra: bytes, cuts: list[int]) -> None:
    raw = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n" + extra
    got, done = _read("chunked", 0, _splits(raw, cuts))
    assert got == b"".join(chunks) and len(done) == 1


def test_close_delimited_never_ends_by_itself() -> None:
    got, done = _read("close", 0, [b"abc", b"", b"def"])
    assert got == b"abcdef" and done == []


def test_empty_bodies_and_a_reader_reused_for_the_next_body() -> None:
    data: list[bytes] = []
    done: list[bytes] = []
    body = ResponseBody(data.append, done.append)
    for framing, remaining, empty in [
        ("none", 0, True), ("length", 0, True), ("length", 1, False), ("chunked", 0, False),
        ("close", 0, False),
    ]:
        body.start(framing, remaining)
        assert body.empty is empty
    body.start("length", 3)
    body.feed(b"abcX")
    body.start("chunked", 0)  # the next answer on the same connection
    body.feed(b"2\r\nde\r\n0\r\n\r\n")
    assert data == [b"abc", b"de"] and done == [b"X", b""]


@pytest.mark.parametrize(
    "raw", [b"zz\r\nabc\r\n", b"3\r\nabcX\r\n", b"-1\r\n", b"%x\r\n" % (1 << 63)]
)
def test_malformed_chunked_is_a_bad_response(raw: bytes) -> None:
    with pytest.raises(BadResponse):
        _read("chunked", 0, [raw])
