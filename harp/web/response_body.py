"""Where an upstream's response body ends, fed as its bytes arrive (no I/O).

Why: two places read an ExApp's answer after its head — the pooled exchange
(:mod:`harp.web.exchange`) and a refused WebSocket upgrade (:mod:`harp.web.upgrade`),
whose ``4xx`` answer is passed on before the client connection goes back to HTTP.  Both
must end the body exactly where its framing says (RFC 9112 §6.3): after Content-Length
bytes, after the last chunk, or at the connection's close; bytes past the end are not
part of it.  :class:`ResponseBody` is that rule, once.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.web.http import _MalformedChunkedDataError

from harp.web.chunks import BoundedChunkedDecoder
from harp.web.response_head import BadResponse


class ResponseBody:
    """One response body at a time, delimited by its framing as :func:`body_framing` gave it.

    :meth:`start` begins a body (a pooled connection reuses one reader for every answer
    it carries: no allocation per response).  Pieces of the body go to ``on_data`` (never
    empty); once the body is complete, ``on_done(extra)`` is called once with the bytes
    that came after it (``b""`` for a well-behaved upstream).  A ``close``-delimited
    body never completes here: its end is the connection's, which the owner sees.
    :meth:`feed` raises :class:`BadResponse` for a malformed chunked body; it is not fed
    after ``on_done``.
    """

    __slots__ = ("_chunks", "_on_data", "_on_done", "empty", "framing", "remaining")

    def __init__(
        self, on_data: Callable[[bytes], None], on_done: Callable[[bytes], None],
    ) -> None:
        self._on_data = on_data
        self._on_done = on_done
        self.framing = "none"
        self.remaining = 0
        #: No body at all: complete before any byte (``HEAD``, 204, 304, length 0).
        self.empty = True
        self._chunks: BoundedChunkedDecoder | None = None

    def start(self, framing: str, remaining: int) -> None:
        """A new body: ``framing`` and ``remaining`` as :func:`body_framing` returns them."""
        self.framing = framing
        self.remaining = remaining
        self.empty = framing == "none" or (framing == "length" and remaining == 0)
        self._chunks = (
            BoundedChunkedDecoder(self._chunk, self._on_done) if framing == "chunked"
            else None
        )

    def feed(self, data: bytes) -> None:
        framing = self.framing
        if framing == "length":
            remaining = self.remaining
            if len(data) < remaining:
                self.remaining = remaining - len(data)
                if data:
                    self._on_data(data)
                return
            self.remaining = 0
            if remaining:
                self._on_data(data[:remaining])
            self._on_done(data[remaining:])
        elif self._chunks is not None:
            try:
                self._chunks.dataReceived(data)
            except _MalformedChunkedDataError as exc:
                raise BadResponse("malformed chunked body") from exc
        elif data:
            self._on_data(data)

    def _chunk(self, data: bytes) -> None:
        if data:
            self._on_data(data)
