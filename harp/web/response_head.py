"""Parsing an upstream's HTTP/1.1 response head from raw bytes (pure, no I/O).

Used by the pooled upstream exchange (harp/web/exchange.py) for every proxied answer,
and by the WebSocket upgrade, which must know what the ExApp answered before it decides
whether the client connection is handed to a relay (only on ``101``) or stays HTTP
(docs/security.md, upgrades).  Heads are remembered by their bytes, and what is asked of a
head (framing, the headers to relay) is worked out once per remembered head
(docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from harp.lru import remember
from harp.web.headers import HOP_BY_HOP

#: A response head larger than this is a broken upstream, not a slow one.
MAX_HEAD: Final = 64 * 1024


#: The characters of a token (RFC 9110 §5.6.2): a header name has no others.
_TCHAR: Final = (
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class BadResponse(Exception):
    """The upstream's response head is not HTTP/1.x."""


class ResponseHead:
    """One parsed response head, shared by every answer that sent the same bytes.

    A plain slotted class: a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``, and its answers are memoised on the object."""

    __slots__ = (
        "_connection", "_end_to_end", "_framing", "_lines", "headers", "index", "raw",
        "reason", "status",
    )

    def __init__(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], raw: bytes,
        index: dict[bytes, list[bytes]],
    ) -> None:
        self.status = status
        self.reason = reason
        #: (lower-case name, value) in the order received.
        self.headers = headers
        #: The head exactly as received, terminating blank line included.
        self.raw = raw
        #: ``headers`` by name, built once by the parser: the framing and hop-by-hop
        #: questions asked of every response (Content-Length, Transfer-Encoding,
        #: Connection) are then one dict look-up each instead of a scan.
        self.index = index
        # Answers worked out on first use and kept: a remembered head (see
        # parse_response_head) is shared by every response that sent the same bytes.
        self._connection: frozenset[bytes] | None = None
        self._end_to_end: list[tuple[bytes, bytes]] | None = None
        self._framing: tuple[str, int] | str | None = None
        self._lines: tuple[bytes, frozenset[bytes]] | None = None

    def __repr__(self) -> str:
        return f"ResponseHead({self.status}, {self.reason!r}, {self.headers!r})"

    def values(self, name: bytes) -> Sequence[bytes]:
        """All values of header ``name`` (lower-case), in order."""
        return self.index.get(name, ())

    def tokens(self, name: bytes) -> set[bytes]:
        """The comma-separated, lower-cased tokens of every ``name`` header."""
        values = self.values(name)
        if not values:
            return set()
        return {
            token.strip().lower()
            for value in values
            for token in value.split(b",")
            if token.strip()
        }


    def connection_tokens(self) -> frozenset[bytes]:
        """The tokens of ``Connection`` (``close``, ``keep-alive``, listed names)."""
        tokens = self._connection
        if tokens is None:
            tokens = self._connection = frozenset(self.tokens(b"connection"))
        return tokens

    def end_to_end(self) -> list[tuple[bytes, bytes]]:
        """The headers a proxy relays: not hop-by-hop, not listed in ``Connection``
        (RFC 9110 §7.6.1).  Shared: callers must not change the list."""
        kept = self._end_to_end
        if kept is None:
            listed = self.connection_tokens()
            kept = self._end_to_end = [
                (name, value) for name, value in self.headers
                if name not in HOP_BY_HOP and name not in listed
            ]
        return kept

    def end_to_end_lines(self) -> tuple[bytes, frozenset[bytes]]:
        """:meth:`end_to_end` as head lines (``name: value`` CRLF each), and their names.

        What an HTTP/1.x response head carries of the upstream's, written once per
        remembered head (harp.web.site.HarpRequest.relay)."""
        lines = self._lines
        if lines is None:
            kept = self.end_to_end()
            lines = self._lines = (
                b"".join([name + b": " + value + b"\r\n" for name, value in kept]),
                frozenset(name for name, _ in kept),
            )
        return lines


def parse_response_head(buffer: bytes) -> tuple[ResponseHead, bytes] | None:
    """``(head, bytes after it)``, or None if the head is not complete yet.

    Raises :class:`BadResponse` for a malformed status line or header, or a head over
    :data:`MAX_HEAD`.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise BadResponse("response head too large")
        return None
    if end > MAX_HEAD:
        raise BadResponse("response head too large")
    raw = buffer[: end + 4]
    head = _HEADS.get(raw)
    if head is None:
        head = _parse(raw, end)
        if end < _MAX_REMEMBERED_HEAD:
            remember(_HEADS, raw, head, _MAX_REMEMBERED_HEADS)
    return head, buffer[end + 4 :]


#: Heads already parsed, by their bytes: an ExApp (a static file server above all) sends
#: the same head answer after answer until its ``Date`` changes, and a head is a pure
#: function of its bytes, so the parse, the framing and the relayed headers are worked out
#: once and shared (docs/performance.md).  Bounded: heads under 2 KiB, emptied when full.
_HEADS: Final[dict[bytes, ResponseHead]] = {}
_MAX_REMEMBERED_HEADS: Final = 512
_MAX_REMEMBERED_HEAD: Final = 2048


def _parse(raw: bytes, end: int) -> ResponseHead:
    """The head ``raw`` (``end``: where its blank line starts), checked."""
    text = raw[:end]
    lines = text.split(b"\r\n")
    breaks = len(lines) - 1
    if text.count(b"\r") != breaks or text.count(b"\n") != breaks or b"\x00" in text:
        # A bare CR or LF, or a NUL, inside a line: HaRP relays header values as they
        # are (harp.web.site.HarpRequest.relay), so such a head is refused, not mended.
        raise BadResponse("bad character in response head")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise BadResponse("bad status line")
    headers: list[tuple[bytes, bytes]] = []
    index: dict[bytes, list[bytes]] = {}
    parsed_lines = _PARSED_LINES
    for line in lines[1:]:
        header = parsed_lines.get(line)
        if header is None:
            header = _parse_header_line(line)
            if len(line) <= _MAX_REMEMBERED_LINE:
                remember(parsed_lines, line, header, _MAX_REMEMBERED_LINES)
        headers.append(header)
        name, value = header
        known = index.get(name)
        if known is None:
            index[name] = [value]
        else:
            known.append(value)
    return ResponseHead(int(code), reason, headers, raw, index)


#: Header lines already parsed, as ``(lower-case name, value)``: an ExApp sends the
#: same lines response after response (Server, Content-Type, Connection...), and the
#: parse is a pure function of the line, so a look-up replaces it (docs/performance.md).
#: Bounded: short lines only, and emptied when full (a changing Date line adds one a
#: second).
_PARSED_LINES: Final[dict[bytes, tuple[bytes, bytes]]] = {}
_MAX_REMEMBERED_LINES: Final = 2048
_MAX_REMEMBERED_LINE: Final = 256


def _parse_header_line(line: bytes) -> tuple[bytes, bytes]:
    name, colon, value = line.partition(b":")
    if not colon or not name or name.translate(None, _TCHAR):
        raise BadResponse("bad header line")  # a name must be a token (RFC 9110 §5.1)
    return name.lower(), value.strip(b" \t")


def body_framing(head: ResponseHead, method: bytes) -> tuple[str, int]:
    """How the response body ends: ``("none", 0)``, ``("length", n)``, ``("chunked", 0)``
    or ``("close", 0)`` (RFC 9112 §6.3).  Raises :class:`BadResponse` for an ambiguous
    framing (several or bad Content-Length, a coding other than chunked).
    """
    if method == b"HEAD":
        return "none", 0
    framing = head._framing
    if framing is None:
        try:
            framing = _framing(head)
        except BadResponse as exc:
            framing = str(exc)
        head._framing = framing
    if isinstance(framing, str):
        raise BadResponse(framing)
    return framing


def _framing(head: ResponseHead) -> tuple[str, int]:
    if head.status in (204, 304) or 100 <= head.status < 200:
        return "none", 0
    codings = head.tokens(b"transfer-encoding")
    if codings:
        if codings != {b"chunked"}:
            raise BadResponse("unsupported transfer-coding")
        return "chunked", 0
    lengths = {value.strip() for value in head.values(b"content-length")}
    if not lengths:
        return "close", 0
    if len(lengths) != 1:
        raise BadResponse("conflicting content-length")
    (length,) = lengths
    if not length.isdigit():
        raise BadResponse("bad content-length")
    return "length", int(length)
