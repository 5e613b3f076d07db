"""HaRP's request-line parser agrees with twisted.web's on every line (differential)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.web.http import _parseRequestLine

from harp.web.request_line import parse_request_line


def _outcome(parse: object, line: bytes) -> object:
    try:
        return parse(line)  # type: ignore[operator]
    except ValueError:
        return ValueError


@pytest.mark.parametrize("line", [
    b"GET / HTTP/1.1", b"GET /x?y=1 HTTP/1.0", b"M-SEARCH * HTTP/1.1", b"GET  / HTTP/1.1",
    b"GET / HTTP/2", b"G(T / HTTP/1.1", b" / HTTP/1.1", b"GET  HTTP/1.1", b"GET /\x7f HTTP/1.1",
    b"GET /\xb0 HTTP/1.1", b"GET /\xb1 HTTP/1.1", b"GET /\x00 HTTP/1.1", b"GET / HTTP/1.1 x",
    b"GET /", b"", b"GET /\t HTTP/1.1", b"\xffET / HTTP/1.1",
])
def test_known_lines(line: bytes) -> None:
    assert _outcome(parse_request_line, line) == _outcome(_parseRequestLine, line)


_PIECE = st.one_of(
    st.sampled_from([b"GET", b"POST", b"/", b"/a?b=c", b"HTTP/1.1", b"HTTP/1.0", b"*", b""]),
    st.binary(max_size=12),
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(_PIECE, min_size=1, max_size=4), st.sampled_from([b" ", b"  ", b"\t"]))
def test_random_lines(pieces: list[bytes], sep: bytes) -> None:
    line = sep.join(pieces)
    assert _outcome(parse_request_line, line) == _outcome(_parseRequestLine, line)
