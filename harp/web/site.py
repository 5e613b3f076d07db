"""The HTTP server side: channel, request and site, adapted for a streaming proxy.

Three changes to ``twisted.web``'s defaults, each for a reverse proxy's needs:

- **Decide on headers, stream the body.**  ``HTTPChannel`` normally calls
  ``requestReceived`` (and so ``render``) only after the whole body has arrived and
  been buffered.  :class:`HarpChannel` starts processing right after the headers, and
  :class:`HarpRequest` feeds the body into a :class:`~harp.web.body.BodyPipe` instead of
  a temporary file.  ``finish()`` is held back until the body is complete, because the
  channel expects one request at a time; an answer given before the client finished
  sending (e.g. a 403 to a big upload) closes the connection instead.
- **A deadline for the request head.**  The idle timeout alone lets a slow-loris
  client trickle one header byte at a time forever; the head must be complete within
  ``HP_TIMEOUT_CLIENT``.
- **Hand-over.**  After an accepted ``Upgrade`` (WebSocket, :mod:`harp.web.upgrade`)
  the channel stops parsing HTTP and hands every byte to a :class:`~harp.relay.Relay`.
  A TLS connection that negotiated ``h2`` by ALPN is handed, before its first byte is
  parsed, to a :class:`~harp.web.h2.HarpH2Connection` (one ``HarpRequest`` per stream).

The channel's private ``_command``/``_path``/``_version`` are read once, in
``allHeadersReceived``: that is the only place the request line is known before the
body, and these attributes have kept their names across Twisted releases.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final, cast

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as BaseProtocol
from twisted.logger import LogLevel
from twisted.protocols import basic
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import NO_BODY_CODES, _ChunkedTransferDecoder
from twisted.web.http import Request as HTTPRequest
from twisted.web.http_headers import Headers, InvalidHeaderName
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from harp import logs
from harp.deadlines import Deadline, deadlines_for
from harp.logs import HarpLogger
from harp.lru import remember
from harp.metrics import Metrics
from harp.relay import Relay
from harp.timers import cancel
from harp.web.body import BodyPipe
from harp.web.chunks import BoundedChunkedDecoder
from harp.web.h2 import HarpH2Connection, HarpH2Stream
from harp.web.headers import HEADERS_DICT, header_values, http_date
from harp.web.limits import ConnectionLimit
from harp.web.relayed_head import relayed_head
from harp.web.request_line import parse_request_line
from harp.writes import end_buffered_write, use_buffered_write

log = HarpLogger("harp.access")

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n"
    b"connection: close\r\n\r\n408 Request Timeout"
)


#: Bytes per second a request body must sustain while HaRP is reading it, measured
#: over windows of ``HP_TIMEOUT_CLIENT`` (Apache's mod_reqtimeout uses the same idea).
MIN_BODY_RATE: Final = 500


#: Heads up to this size may take the one-pass path (:meth:`HarpChannel._whole_head`):
#: below twisted.web's line and head limits (16 KiB each), which it then cannot reach.
FAST_HEAD_MAX: Final = 8192

#: The request headers that decide the body's framing, by lower-case name, with the
#: canonical name twisted.web's framing code compares against.
_FRAMING: Final = {b"content-length": b"Content-Length", b"transfer-encoding": b"Transfer-Encoding"}

#: Request header blocks already parsed (the header lines of a head as received, without a
#: framing header), as (header count, ``Headers``' own name → values): a client sends the
#: same headers request after request, and their parse is a pure function of the bytes.
#: Bounded: blocks up to 2 KiB, emptied when full (docs/performance.md).
_PARSED_HEADERS: Final[dict[bytes, tuple[int, tuple[tuple[bytes, tuple[bytes, ...]], ...]]]] = {}
_MAX_REMEMBERED_BLOCKS: Final = 1024
_MAX_REMEMBERED_BLOCK: Final = 2048

#: A head starting with these is for the line-by-line path (an empty line before the
#: request line, which twisted.web skips once, or whitespace).
_NOT_A_REQUEST_START: Final = frozenset(b"\r\n \t")


class HarpChannel(http.HTTPChannel):
    head_timeout: float = 30.0
    clock: IReactorTime = _reactor  # type: ignore[assignment]
    #: Set once the connection is handed over (:meth:`hand_over`): no more HTTP.
    relay: Relay | None = None
    discarding = False
    limit: ConnectionLimit | None = None
    #: Set when TLS negotiated ``h2``: every byte belongs to it.
    h2: HarpH2Connection | None = None
    _alpn_checked = False
    _head_timer: Deadline | None = None
    _idle: Deadline | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        use_buffered_write(self.transport)  # a plain TCP client (HTTPS has its own layer)
        self._arm_head_timer()

    _host: Any = None
    _peer: Any = None

    def getHost(self) -> Any:
        # twisted.web asks for every request (a getsockname syscall each time); the
        # local address of a connection never changes.
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def getPeer(self) -> Any:
        # Asked for every request too (a new address object each time); the peer of a
        # connection never changes either.
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.from_client(data)
        elif self.h2 is not None:
            self.h2.dataReceived(data)
        elif not self.discarding:
            if not self._alpn_checked:
                # The first bytes arrive after the TLS handshake, so ALPN is settled.
                self._alpn_checked = True
                if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                    self._switch_to_h2().dataReceived(data)
                    return
            if (
                self.line_mode and not self._buffer and not self._busyReceiving
                and self._HTTPChannel__first_line == 1  # type: ignore[attr-defined]
            ):
                end = data.find(b"\r\n\r\n")
                if 0 < end < FAST_HEAD_MAX and self._whole_head(data, end):
                    return
            super().dataReceived(data)

    def _whole_head(self, data: bytes, end: int) -> bool:
        """A request head that arrived whole, parsed in one pass; False: not handled.

        Why: ``LineReceiver`` splits the head line by line and ``HTTPChannel.lineReceived``
        then dispatches each line (request line, header, header…, blank) with its own
        bookkeeping; a browser's head of fifteen headers made that a few per cent of a
        request.  Nearly every head arrives in one read, so it is split once here and
        each part goes to what ``lineReceived`` would have called: the request line to
        twisted.web's own parser, every header to ``headerReceived`` (the same checks,
        limits and framing decisions), then ``allHeadersReceived``.  Anything unusual
        — a head split across reads, folded header lines, the blank line tolerated
        before a request, a connection that is closing — is left untouched to the
        line-by-line path.  Both paths must give the same outcome for the same bytes
        (tests/unit/test_channel_fuzz.py feeds random heads both ways).
        """
        head = data[:end]
        if head[0] in _NOT_A_REQUEST_START or b"\r\n " in head or b"\r\n\t" in head:
            return False
        if not self.persistent:
            return False
        self.resetTimeout()
        lines = head.split(b"\r\n")
        # What lineReceived adds up line by line (delimiters not counted); FAST_HEAD_MAX
        # keeps it and every line under twisted.web's limits.
        self._receivedHeaderSize += end - 2 * (len(lines) - 1)
        # Bytes after the head wait where LineReceiver keeps them, so that what happens
        # meanwhile (a response finished at once, a re-entrant dataReceived) sees the
        # same state as on the line-by-line path.
        self._buffer = data[end + 4:]
        self._busyReceiving = True
        try:
            self._head_received(lines, head[len(lines[0]) + 2:])
        finally:
            self._busyReceiving = False
        if self._buffer and not getattr(self.transport, "disconnecting", False):
            basic.LineReceiver.dataReceived(self, b"")  # the rest, as LineReceiver goes on
        return True

    def _head_received(self, lines: list[bytes], block: bytes) -> None:
        """``lineReceived`` for the request line, each header and the blank line.

        ``block``: the header lines as received (``lines[1:]`` unsplit)."""
        request = cast(
            "HarpRequest",
            self.requestFactory(self, len(self.requests)),  # type: ignore[attr-defined]
        )
        request.header_block = block
        self.requests.append(request)
        self._HTTPChannel__first_line = 0
        try:
            command, path, version = parse_request_line(lines[0])
        except ValueError:
            self._respondToBadRequestAndDisconnect()
            return
        self._command = command
        self._path = path
        self._version = version
        if not self._headers_received(request.requestHeaders, lines, block):
            return  # refused and dropped (the line-by-line path stops there too)
        self.allHeadersReceived()
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()

    def _switch_to_h2(self) -> HarpH2Connection:
        """Hand the connection to HTTP/2 (:mod:`harp.web.h2`) before any HTTP/1.1 parsing."""
        self._cancel_head_timer()
        self.setTimeout(None)
        network: Any = self._networkProducer  # the TLS transport
        network.unregisterProducer()
        site = getattr(self, "site", None)  # set by Site.buildProtocol
        h2 = HarpH2Connection(self.clock, self.head_timeout)
        h2.requestFactory = self.requestFactory
        h2.site = site
        h2.factory = self.factory
        h2.on_malformed = getattr(site, "on_malformed", None)
        self.h2 = h2
        h2.makeConnection(self.transport)
        # The h2 connection now pauses and resumes on the transport's buffer.
        network.registerProducer(h2, True)
        return h2

    def rawDataReceived(self, data: bytes) -> None:
        # Body bytes that arrive in the same segment as the headers come here directly,
        # not through dataReceived.
        if not self.discarding:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        """twisted.web's steps once the head is in (cookies, persistence, body length,
        ``Expect: 100-continue``), with HaRP's header look-ups, then processing.

        Why not ``super()``: twisted.web reads its three headers with ``getRawHeaders``,
        which canonicalises each name on every call (≈ 4 % of a small request's Python
        with the calls around them); the decisions are the same, kept step by step.
        """
        self._cancel_head_timer()
        request = self.requests[-1]
        version = self._version
        request.head = (self._command, self._path, version)
        request.parseCookies()
        self.persistent = self.checkPersistence(request, version)
        request.gotLength(self.length)
        expect = header_values(request.requestHeaders, b"expect")
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            self._send100Continue()  # type: ignore[no-untyped-call]
        request.begin()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """twisted.web's rule, read with HaRP's look-up: HTTP/1.1 stays open unless the
        first ``Connection`` header, split at spaces as twisted.web splits it, says
        ``close`` (then the response says ``Connection: close`` too); older versions close.
        """
        connection = header_values(request.requestHeaders, b"connection")
        if version != b"HTTP/1.1":
            return False
        if connection and b"close" in [t.lower() for t in connection[0].split(b" ")]:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True

    def allContentReceived(self) -> None:
        if self.discarding or not self.requests:
            # An early answer (which closes the connection) already ended this request
            # while its last body bytes were being parsed: nothing is left to complete.
            return
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        # Armed before the parent parses any pipelined request, which cancels it again.
        if self.relay is None:
            self._arm_head_timer()
        super().requestDone(request)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        end_buffered_write(self.transport)
        self._cancel_head_timer()
        limit, self.limit = self.limit, None
        if limit is not None:
            limit.closed()
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.client_lost()
        if self.h2 is not None:
            self.h2.connectionLost(reason)
        super().connectionLost(reason)

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Any
    ) -> None:
        """twisted.web's head, with a ``Date`` (added here, so a relayed head that has
        the upstream's own never pays for setting HaRP's first)."""
        if isinstance(headers, Headers) and not headers.hasHeader(b"date"):
            headers.setRawHeaders(b"date", [http_date()])
        super().writeHeaders(version, code, reason, headers)

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        # Twisted ignores ``Transfer-Encoding: identity`` (and would then read the body
        # as the next request): the only coding a request may declare is exactly
        # ``chunked`` (docs/security.md, request framing).
        if header == b"Transfer-Encoding" and data.lower() != b"chunked":
            self._respondToBadRequestAndDisconnect()
            return False
        ok: bool = super()._maybeChooseTransferDecoder(header, data)
        decoder = self._transferDecoder
        # The class is imported, not read as ``http._ChunkedTransferDecoder``:
        # twisted.web.http is a deprecation proxy whose every attribute read costs a
        # ``__getattribute__`` call (≈1 % of a small request).
        if ok and type(decoder) is _ChunkedTransferDecoder:
            self._transferDecoder = BoundedChunkedDecoder(
                decoder.dataCallback, decoder.finishCallback
            )
        return ok

    def _headers_received(self, headers: Headers, lines: list[bytes], block: bytes) -> bool:
        """``headerReceived`` for each header line of a whole head, in one loop.

        The same checks in the same order of consequence (twisted.web's
        ``headerReceived``): a line without a colon, a value with NUL, CR or LF, a name
        that is not a token, a bad framing header, or more than ``maxHeaders`` headers
        drop the request.  Only the two framing headers go through
        :meth:`_maybeChooseTransferDecoder`; the name is canonicalised once (by
        ``addRawHeader``), not twice.

        A block of header lines parsed before without a framing header (so with no
        effect on the channel but the headers themselves) gives the same headers again:
        they are copied from :data:`_PARSED_HEADERS` instead (docs/performance.md).
        """
        start = self._receivedHeaderCount
        remembered = _PARSED_HEADERS.get(block) if HEADERS_DICT and not start else None
        if remembered is not None and remembered[0] <= self.maxHeaders:
            count, parsed = remembered
            headers._rawHeaders = {name: list(values) for name, values in parsed}
            self._receivedHeaderCount = count
            return True
        add = headers.addRawHeader
        count = start
        framed = False
        for line in lines[1:]:
            # No empty line can be here: the head ended at the first one.
            name, colon, value = line.partition(b":")
            value = value.strip(b" \t")
            if not colon or b"\x00" in value or b"\r" in value or b"\n" in value:
                self._respondToBadRequestAndDisconnect()
                return False
            framing = _FRAMING.get(name.lower())
            if framing is not None:
                framed = True
                if not self._maybeChooseTransferDecoder(framing, value):
                    return False
            try:
                add(name, value)
            except InvalidHeaderName:
                self._respondToBadRequestAndDisconnect()
                return False
            count += 1
            if count > self.maxHeaders:
                self._receivedHeaderCount = count
                self._respondToBadRequestAndDisconnect()
                return False
        self._receivedHeaderCount = count
        if HEADERS_DICT and not framed and not start and len(block) <= _MAX_REMEMBERED_BLOCK:
            parsed = tuple((name, tuple(values)) for name, values in headers._rawHeaders.items())
            remember(_PARSED_HEADERS, block, (count, parsed), _MAX_REMEMBERED_BLOCKS)
        return True

    def _respondToBadRequestAndDisconnect(self) -> None:
        # The reference answers a malformed request (bad request line, oversized or
        # broken headers) with a silent drop, not a 400 (docs/security.md).  It
        # counts as a failure of its client, like any other probe.
        if not self.discarding and self.requests:
            on_malformed = getattr(getattr(self, "site", None), "on_malformed", None)
            if on_malformed is not None:
                on_malformed(self.requests[-1])
        self.discarding = True
        if self.transport is not None:
            self.transport.loseConnection()

    def body_too_slow(self, answered: bool) -> None:
        """Cut a request whose body trickles in (see :data:`MIN_BODY_RATE`)."""
        self.discarding = True
        if self.transport is None:
            return
        if not answered:
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def hand_over(self, relay: Relay) -> None:
        """Stop speaking HTTP: every further byte, and those buffered, belong to *relay*.

        The relay's idle limit replaces the channel's timeouts: an idle WebSocket must
        not be cut at ``HP_TIMEOUT_CLIENT``.
        """
        self._cancel_head_timer()
        self.setTimeout(None)
        self._savedTimeOut = None
        self.relay = relay
        buffered = b"".join(self._dataBuffer)
        self._dataBuffer = []
        if buffered:
            relay.from_client(buffered)

    # Both limits are coarse deadlines (harp/deadlines.py), reused across the requests of
    # a connection: seconds-long limits set and unset around every request would
    # otherwise be a reactor timer created and cancelled each time.

    def setTimeout(self, period: float | None) -> float | None:  # type: ignore[override]
        """Twisted's idle limit (``TimeoutMixin``), kept as one reusable deadline."""
        previous: float | None = self.timeOut
        self.timeOut = period  # type: ignore[assignment]  # Twisted says int; seconds
        if period is None:
            cancel(self._idle)
        else:
            self._idle = deadlines_for(self.clock).rearm(self._idle, period, self._idle_timed_out)
        return previous

    def resetTimeout(self) -> None:
        idle = self._idle
        if idle is not None and idle.action is not None:
            idle.reset(self.timeOut)  # type: ignore[arg-type]

    def _idle_timed_out(self) -> None:
        self.timeoutConnection()

    def _arm_head_timer(self) -> None:
        if self.head_timeout:
            self._head_timer = deadlines_for(self.clock).rearm(
                self._head_timer, self.head_timeout, self._head_timed_out
            )

    def _cancel_head_timer(self) -> None:
        cancel(self._head_timer)

    def _head_timed_out(self) -> None:
        if self.transport is None:
            return
        if self.requests:
            # A request started but its head did not complete: slow or broken client.
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.loseConnection()
        else:
            # Idle keep-alive connection: close quietly.
            self.transport.loseConnection()


class HarpRequest(Request):
    """A request processed from its headers on, with a streamed body."""

    head: tuple[bytes, bytes, bytes] | None = None
    #: The header lines of the head as received (after the request line), when the head
    #: was parsed in one pass: what ``requestHeaders`` was made from, so what is
    #: forwarded of them can be remembered by these bytes (harp/web/proxy.py).
    header_block: bytes | None = None
    body: BodyPipe | None = None
    has_body = False
    body_complete = False
    closing_early = False
    _finish_pending = False
    started: float = 0.0
    app_id: str = "-"
    #: Why HaRP dropped the request (no response): the access line says ``drop``.
    note: str = ""
    #: What went wrong besides the status (an unreachable upstream...), for the access line.
    detail: str = ""
    #: Set once the access line is written: exactly one per request.
    logged = False
    #: For an upgraded connection: (seconds until the 101, bytes up, bytes down).
    tunnel: tuple[float, int, int] | None = None
    # A proxied response without Content-Type must stay without one.
    defaultContentType = None

    #: Upstream headers to write as they are with the head (:meth:`relay`).
    _relayed: tuple[bytes, frozenset[bytes]] | None = None
    _paused = False
    _body_bytes = 0
    _rate_mark = 0
    _rate_timer: IDelayedCall | None = None

    def __init__(
        self, channel: Any, *args: Any, parsePOSTFormSubmission: bool | None = None, **kw: Any
    ) -> None:
        """What twisted.web's ``server.Request``, ``http.Request`` and ``Componentized``
        set up, in one call.

        Why: the three chained ``__init__`` were ≈ 4 % of a small request's Python,
        mostly the calls themselves.  The same attributes with the same values;
        tests/unit/test_site_limits.py fails if Twisted's set ever differs from this one.
        """
        self.notifications = []
        self.channel = channel
        self.client = channel.getPeer()
        self.host = channel.getHost()
        self.requestHeaders = Headers()
        self.received_cookies = {}
        self.responseHeaders = Headers()
        self.cookies = []
        self.transport = channel.transport
        # twisted.web's deprecated ``queued``: the channel passes it, HTTP/2 by name.
        self.queued = args[0] if args else kw.get("queued", False)
        self._parsePOSTFormSubmission = (
            channel.site._parsePOSTFormSubmission if parsePOSTFormSubmission is None
            else parsePOSTFormSubmission
        )
        self._adapterCache = {}

    def parseCookies(self) -> None:
        """twisted.web's cookie parse (``name=value`` pairs split at ``;``, the last of a
        name kept, malformed pairs skipped), with HaRP's header look-up."""
        for text in header_values(self.requestHeaders, b"cookie") or ():
            if text:
                for cookie in text.split(b";"):
                    name, equals, value = cookie.lstrip().partition(b"=")
                    if equals:
                        self.received_cookies[name] = value

    def relay(self, status: int, reason: bytes, lines: bytes, names: frozenset[bytes]) -> None:
        """Answer with an upstream's status and end-to-end headers (HTTP/1.x).

        Why: through ``Headers`` every upstream header was re-encoded, re-sanitized and
        iterated again by ``writeHeaders`` (≈5 % of a small request).  The response-head
        parser already refused names that are not tokens and values with CR, LF or NUL
        (harp/web/response_head.py), so the head is written from them as they are,
        names in lower case as the parser gives them (HAProxy sends them so too).
        ``lines`` are those headers as head lines, ``names`` their names
        (:meth:`harp.web.response_head.ResponseHead.end_to_end_lines`).
        """
        self.setResponseCode(status, reason)
        self._relayed = (lines, names)

    def write(self, data: bytes) -> None:
        if self._relayed is not None:
            self._write_relayed_head(data)
        else:
            super().write(data)

    def _write_relayed_head(self, data: bytes) -> None:
        """What twisted.web's first ``write`` does, for relayed headers, plus ``data``.

        The head and the first piece of the body leave in one write: a small answer is
        one buffer handed to the transport, not two.
        """
        relayed = self._relayed
        self._relayed = None
        assert relayed is not None
        if self.startedWriting or self.finished or self._disconnected:
            super().write(data)  # twisted.web raises or ignores, as it would
            return
        self.startedWriting = 1
        lines, names = relayed
        bodiless = self.method == b"HEAD" or self.code in NO_BODY_CODES
        head, chunked = relayed_head(
            self.clientproto, self.code, self.code_message, lines, names,
            self.responseHeaders.getAllRawHeaders(), self.cookies, bodiless, data,
        )
        if bodiless:
            self.channel.write(head)
            self.write = _discard  # type: ignore[method-assign]  # as twisted.web: no body
            return
        if chunked:
            self.chunked = 1
        self.sentLength += len(data)
        # One buffer: writeSequence would check and queue each of the pieces.
        self.channel.write(head)

    def gotLength(self, length: int | None) -> None:
        # No super(): it would create the buffer (BytesIO or temp file) we avoid.
        self.content = None
        self.has_body = length is None or length > 0
        # No pipe for a bodiless request: the pipe points back at its request, so each
        # one would be a reference cycle left to the garbage collector (docs/performance.md).
        self.body = BodyPipe(self, length) if self.has_body else None
        if self.has_body:
            self._arm_rate_check()

    def handleContentChunk(self, data: bytes) -> None:
        assert self.body is not None
        self._body_bytes += len(data)
        self.body.write(data)

    # A minimum upload rate: the idle timer alone lets a client hold a connection
    # (and an upstream request) forever by sending one body byte every few seconds.

    def _arm_rate_check(self) -> None:
        channel = self.channel
        if isinstance(channel, HarpChannel | HarpH2Stream) and channel.head_timeout:
            self._rate_mark = self._body_bytes
            self._rate_timer = channel.clock.callLater(channel.head_timeout, self._check_rate)

    def _cancel_rate_check(self) -> None:
        cancel(self._rate_timer)
        self._rate_timer = None

    def _check_rate(self) -> None:
        self._rate_timer = None
        # Twisted drops the request's channel once the response is done.
        channel = getattr(self, "channel", None)
        if (
            self.body_complete or self.finished or self._disconnected
            or not isinstance(channel, HarpChannel | HarpH2Stream)
        ):
            return
        received = self._body_bytes - self._rate_mark
        if not self._paused and received < MIN_BODY_RATE * channel.head_timeout:
            # The access line says it (written when the connection closes).
            log.debug("request body slower than {rate} B/s: closing", rate=MIN_BODY_RATE)
            self.note = "slow request body"
            channel.body_too_slow(bool(self.startedWriting))
            return
        self._arm_rate_check()

    def begin(self) -> None:
        """Headers complete: set up what ``requestReceived`` would, then process."""
        assert self.head is not None
        self.started = time.monotonic()
        command, uri, version = self.head
        self.method, self.uri, self.clientproto = command, uri, version
        self.path = uri.split(b"?", 1)[0]
        self.args = {}
        self.process()

    def process(self) -> None:
        """Hand the request to the one root resource.

        twisted.web's version also announces the server, splits and unquotes the path
        into ``postpath`` and walks a resource tree; HaRP's root is a leaf that reads
        the raw path, so that is work thrown away on every request.  ``*`` is not
        special either: the pipeline refuses it like any target that is not
        origin-form (twisted.web would answer it with a 405 of its own).
        """
        site = self.channel.site  # type: ignore[attr-defined]  # set by Site.buildProtocol
        self.site = site
        self.prepath = []
        self.postpath = []
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """Called by the channel when the body is complete (processing began earlier)."""
        self.body_complete = True
        if self._rate_timer is not None:  # none for a bodiless request: no call
            self._cancel_rate_check()
        if self.body is not None:
            self.body.finish()
        if self._finish_pending:
            self._finish_pending = False
            super().finish()

    def finish(self) -> None:
        if not self.body_complete and not self.closing_early and not self._disconnected:
            self._finish_pending = True
            return
        if self._rate_timer is not None:
            self._cancel_rate_check()
        if self._encoder is None:
            # twisted.web.server's finish only adds an encoder's flush: one call less.
            HTTPRequest.finish(self)  # the module's class, read once (see above)
        else:
            super().finish()

    def close_early(self) -> None:
        """Answer before the client sent all of its body: close after the response."""
        if self.body_complete or not self.has_body:
            return
        self.closing_early = True
        channel = self.channel
        # HTTP/2 needs no close: the stream is reset (NO_ERROR) once answered.
        if not self.startedWriting and not isinstance(channel, HarpH2Stream):
            self.setHeader(b"connection", b"close")
        if isinstance(channel, HarpChannel):
            channel.persistent = False
            channel.discarding = True
        if self.body is not None:
            self.body.discard()

    # FlowControl for the BodyPipe: pause reading from the client.

    #: Called once if the client goes away before the response is finished (cheaper
    #: than a ``notifyFinish`` Deferred per proxied request).
    on_lost: Callable[[], None] | None = None

    def connectionLost(self, reason: Failure) -> None:
        if self._rate_timer is not None:
            self._cancel_rate_check()
        super().connectionLost(reason)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None and not self.finished:
            on_lost()
        if not self.finished and not self.logged and self.started:
            # Ended without finish() (client gone, response aborted, connection cut):
            # still one access line.  A request whose head never completed has none.
            if not self.note and not self.detail:
                self.detail = "client gone"
            site = getattr(self, "site", None)
            if site is not None:
                site.log(self)

    def pause_client(self) -> None:
        self._paused = True
        channel = self.channel
        if isinstance(channel, HarpH2Stream):
            channel.pauseProducing()  # this stream's window stays closed
        elif channel is not None and channel.transport is not None:
            channel.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume_client(self) -> None:
        self._paused = False
        channel = self.channel
        if isinstance(channel, HarpH2Stream):
            channel.resumeProducing()
        elif channel is not None and channel.transport is not None:
            channel.transport.resumeProducing()  # type: ignore[attr-defined]


def _discard(data: bytes) -> None:
    """A response that may have no body writes none (twisted.web does the same)."""


class HarpSite(Site):
    """A Site whose access log is one line at info level, without secrets or query."""

    requestFactory = HarpRequest
    protocol = HarpChannel  # type: ignore[assignment]
    #: Told of each malformed request before it is dropped (counted for bans).
    on_malformed: Callable[[Request], None] | None = None
    displayTracebacks = False
    noisy = False

    def __init__(
        self, resource: Resource, head_timeout: float, metrics: Metrics | None = None,
        limit: ConnectionLimit | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.head_timeout = head_timeout
        self.metrics = metrics or Metrics()
        self.limit = limit

    def buildProtocol(self, addr: Any) -> HarpChannel | _Refuse:  # type: ignore[override]
        limit = self.limit
        if limit is not None and not limit.try_open():
            return _Refuse()
        channel: HarpChannel = super().buildProtocol(addr)
        channel.head_timeout = self.head_timeout
        channel.limit = limit
        return channel


    def log(self, request: http.Request) -> None:
        """The request's one access line (docs/operations.md, "Logs") and its metrics.

        Called by ``finish()``, by the root for a dropped request, by the request when
        its connection ends without a finished response, and by an upgrade when its
        tunnel closes; whichever comes first writes the line.
        """
        if not isinstance(request, HarpRequest) or request.logged:
            return
        request.logged = True
        elapsed = time.monotonic() - request.started
        tunnel = request.tunnel
        if request.note:
            self.metrics.drop(request.note)
        elif tunnel is not None:
            # The time to the 101, not the tunnel's life, belongs with response times.
            self.metrics.response(101, tunnel[0])
        elif not request._disconnected:
            # From finish() (which sets ``finished`` only after logging); a request whose
            # connection ended first sent no complete response to count.
            self.metrics.response(request.code, elapsed)
        if not logs.enabled(LogLevel.info):
            return
        client = request.getClientAddress()
        log.info(
            "{client} {method} {path} {status} app={app} {ms:.1f}ms{extra}",
            client=getattr(client, "host", "-"),
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            status=_status(request),
            app=request.app_id,
            ms=elapsed * 1000,
            extra=_extra(request),
        )


def _status(request: HarpRequest) -> str | int:
    """``drop`` (closed unanswered on purpose), the status sent, or ``-`` (none sent)."""
    if request.note:
        return "drop"
    if request.tunnel is not None:
        return 101
    return request.code if request.startedWriting else "-"


def _extra(request: HarpRequest) -> str:
    """The access line's tail: a tunnel's bytes, and why a request ended as it did."""
    parts = []
    tunnel = request.tunnel
    if tunnel is not None:
        parts.append(f"tunnel {tunnel[1]} B up, {tunnel[2]} B down")
    if request.note:
        parts.append(request.note)
    if request.detail:
        parts.append(request.detail)
    return f" ({'; '.join(parts)})" if parts else ""


class _Refuse(BaseProtocol):
    """A connection accepted past ``HP_MAX_CONNECTIONS``: closed at once, unread."""

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
