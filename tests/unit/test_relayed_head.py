"""harp/web/relayed_head.py: the relayed response head as bytes (pure)."""

from __future__ import annotations

from harp.web.relayed_head import relayed_head

LINES = b"content-type: text/plain\r\ndate: Sat, 05 Dec 2026 07:00:00 GMT\r\n"
NAMES = frozenset({b"content-type", b"date"})


def test_upstream_lines_follow_harps_own_and_a_length_is_not_chunked() -> None:
    head, chunked = relayed_head(
        b"HTTP/1.1", 200, b"OK", LINES + b"content-length: 2\r\n", NAMES | {b"content-length"},
        [(b"Connection", [b"close"])], [], False, b"hi",
    )
    assert head == (b"HTTP/1.1 200 OK\r\nConnection: close\r\n" + LINES
                    + b"content-length: 2\r\n\r\nhi")
    assert not chunked


def test_without_a_length_http11_is_chunked_and_http10_is_not() -> None:
    head, chunked = relayed_head(b"HTTP/1.1", 200, b"OK", LINES, NAMES, [], [], False, b"hi")
    assert chunked and head.endswith(b"transfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
    head, chunked = relayed_head(b"HTTP/1.0", 200, b"OK", LINES, NAMES, [], [], False, b"hi")
    assert not chunked and head.endswith(LINES + b"\r\nhi")
    # An empty first piece: no empty chunk (that would end the body).
    head, chunked = relayed_head(b"HTTP/1.1", 200, b"OK", LINES, NAMES, [], [], False, b"")
    assert chunked and head.endswith(b"chunked\r\n\r\n")


def test_harps_own_length_counts_and_the_upstreams_name_wins() -> None:
    own = [(b"Content-Length", [b"2"]), (b"Content-Type", [b"harp/own"])]
    head, chunked = relayed_head(b"HTTP/1.1", 200, b"OK", LINES, NAMES, own, [], False, b"hi")
    assert not chunked and b"Content-Length: 2\r\n" in head
    assert b"harp/own" not in head  # the upstream sent content-type


def test_a_date_only_when_the_upstream_sent_none_and_cookies_last() -> None:
    head, _ = relayed_head(
        b"HTTP/1.1", 204, b"No Content", b"", frozenset(), [], [b"a=1"], True, b"dropped",
    )
    assert head.startswith(b"HTTP/1.1 204 No Content\r\nDate: ")
    assert head.endswith(b"\r\nSet-Cookie: a=1\r\n\r\n") and b"dropped" not in head
