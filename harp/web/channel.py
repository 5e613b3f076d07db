"""The HTTP/1.x server side of a client connection: HaRP's own channel, compiled.

Why not twisted.web's ``HTTPChannel``: it parses a head line by line through
``LineReceiver`` and keeps its state in attributes shared by a chain of Python classes,
so nothing of it can be compiled, and after everything else was, it and HaRP's
adaptations of it were most of the Python left per small request (docs/performance.md).
This channel keeps twisted.web's interface towards the request (``HarpRequest`` stays a
``twisted.web`` request, served by the same resources) and twisted.web's rules for what a
head may be, as one explicit state machine:

- ``HEAD``: bytes accumulate until the blank line; the head is then parsed in one pass
  (request line, header lines with obsolete folding, limits), and the request is
  processed from its headers on.  One empty line before a request line is skipped, as
  twisted.web does.
- ``BODY``: body bytes go through the framing's decoder to the request's body pipe.
- ``BUSY``: the request is complete and being answered; bytes of the next (pipelined)
  request wait, and past :data:`EAGER_READ` the client is not read any more.
- ``CLOSED``: the connection is ending; nothing more is parsed.

What is refused is refused as before (docs/security.md, request framing): a malformed
request line, header, framing, an over-long line or head, or too many headers drop the
connection without an answer and count as a failure of the client.  Where twisted.web
answered an over-long line with a plain close, this counts it too: it is a probe like
any other.  tests/unit/test_channel_fuzz.py holds the channel to twisted.web's
outcomes for the same bytes.

The rest of the connection's life is as before: a deadline for the head, the idle limit
between requests, ``Expect: 100-continue``, the response side's back-pressure passed to
the request's producer, the hand-over to a relay after an upgrade and to HTTP/2 after
ALPN.
"""

from __future__ import annotations

from typing import Any, Final

from twisted.internet import reactor as _reactor
from twisted.internet._producer_helpers import _PullToPush
from twisted.internet.interfaces import IPushProducer, ISSLTransport, ITCPTransport
from twisted.web.http import _MalformedChunkedDataError, _NoPushProducer
from twisted.web.http_headers import Headers, InvalidHeaderName

from harp.credentials import parse_cookies
from harp.deadlines import Deadline, deadlines_for
from harp.logs import HarpLogger
from harp.lru import remember
from harp.relay import Relay
from harp.timers import cancel
from harp.web.chunks import BoundedChunkedDecoder
from harp.web.h2 import HarpH2Connection
from harp.web.headers import HEADERS_DICT, header_values, http_date
from harp.web.request_line import parse_request_line
from harp.writes import end_buffered_write, use_buffered_write

log = HarpLogger("harp.access")

#: The channel's states (see the module's docstring).
HEAD: Final = 0
BODY: Final = 1
BUSY: Final = 2
CLOSED: Final = 3

#: Longest line of a head (twisted.web's ``LineReceiver.MAX_LENGTH``).
MAX_LINE: Final = 16384
#: Largest head, counted as twisted.web counts it: its lines without their CRLF.
MAX_HEAD: Final = 16384
#: Most header lines in one head (twisted.web's ``maxHeaders``).
MAX_HEADERS: Final = 500
#: How much an incomplete head over :data:`MAX_LINE` may grow between two checks of the
#: limits (each is a split of the whole head; the complete head is always checked).
CHECK_EVERY: Final = 4096
#: Bytes of pipelined requests read while one is answered, before reading pauses
#: (twisted.web's ``_optimisticEagerReadSize``).
EAGER_READ: Final = 0x4000
#: Seconds a timed-out connection may take to close before it is aborted.
ABORT_AFTER: Final = 15.0

_TIMEOUT_RESPONSE: Final = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n"
    b"connection: close\r\n\r\n408 Request Timeout"
)
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

#: Request header blocks already parsed (the header lines of a head as received, without a
#: framing header), as (header count, ``Headers``' own name → values): a client sends the
#: same headers request after request, and their parse is a pure function of the bytes.
#: Bounded: blocks up to 2 KiB, emptied when full (docs/performance.md).
_PARSED_HEADERS: Final[dict[bytes, tuple[int, tuple[tuple[bytes, tuple[bytes, ...]], ...]]]] = {}
_MAX_REMEMBERED_BLOCKS: Final = 1024
_MAX_REMEMBERED_BLOCK: Final = 2048

_CONTENT_LENGTH: Final = b"content-length"
_TRANSFER_ENCODING: Final = b"transfer-encoding"


def unfold(lines: list[bytes]) -> list[bytes]:
    """Header lines with obsolete line folding joined as twisted.web joins them.

    A line starting with a space or tab continues the previous one: its leading
    whitespace becomes one space.  A continuation with nothing before it starts a header
    of its own (which then has an invalid name and is refused).
    """
    joined: list[bytes] = []
    current = b""
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            current += b" " + line.lstrip(b" \t")
        else:
            if current:
                joined.append(current)
            current = line
    if current:
        joined.append(current)
    return joined


def lines_within_limits(lines: list[bytes], tail: int) -> bool:
    """Whether head lines (without CRLF) and a ``tail`` of bytes not yet a line stay
    within :data:`MAX_LINE` each and :data:`MAX_HEAD` together."""
    size = 0
    for line in lines:
        length = len(line)
        size += length
        if length > MAX_LINE or size > MAX_HEAD:
            return False
    return tail <= MAX_LINE


class HarpChannel:
    """One client connection speaking HTTP/1.x (and handed on to HTTP/2 or a relay).

    Built by :class:`harp.web.site.HarpSite`; the request objects it makes are the site's
    ``requestFactory``'s (``HarpRequest``), which call back :meth:`write`,
    :meth:`writeHeaders`, :meth:`requestDone` and the producer methods as they would on
    twisted.web's channel.
    """

    def __init__(self, site: Any, head_timeout: float, idle_timeout: float | None) -> None:
        self.site = site
        self.factory = site
        self.requestFactory: Any = site.requestFactory
        self.head_timeout = head_timeout
        #: The idle limit between requests (``HP_TIMEOUT_CLIENT``); None: none.
        self.timeOut = idle_timeout
        self.clock: Any = _reactor
        self.transport: Any = None
        self.connected = 0
        self.limit: Any = None
        #: Set once the connection is handed over (:meth:`hand_over`): no more HTTP.
        self.relay: Relay | None = None
        #: Set when TLS negotiated ``h2``: every byte belongs to it.
        self.h2: HarpH2Connection | None = None
        #: Set when the rest of what the client sends is to be ignored (a dropped
        #: request, an answer given before the body was read).
        self.discarding = False
        self.persistent = True
        #: The requests begun and not yet done (one, unless an answer is still being
        #: written when the next one's head is parsed: none is, see ``BUSY``).
        self.requests: list[Any] = []
        self.state = HEAD
        #: Bytes received and not yet parsed.
        self.buffer = b""
        self._scanned = 0
        self._checked = 0
        self._parsing = False
        self._blank_allowed = True
        self._alpn_checked = False
        self._secure = False
        self._network: Any = None
        self._reading_paused = False
        self._waiting_for_transport = False
        self._producer: Any = None
        self._producer_streaming = False
        self._remaining = 0
        self._chunked: BoundedChunkedDecoder | None = None
        self._saved_timeout: float | None = None
        self._head_timer: Deadline | None = None
        self._idle: Deadline | None = None
        self._aborting: Any = None
        self._host: Any = None
        self._peer: Any = None

    # --- the connection

    def makeConnection(self, transport: Any) -> None:
        self.connected = 1
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        self._secure = ISSLTransport(transport, None) is not None
        self.setTimeout(self.timeOut)
        network = IPushProducer(transport, None)
        self._network = network if network is not None else _NoPushProducer()
        self._network.registerProducer(self, True)
        use_buffered_write(transport)  # a plain TCP client (HTTPS has its own layer)
        self._arm_head_timer()

    def logPrefix(self) -> str:
        return "HarpChannel"

    def getHost(self) -> Any:
        # Asked for every request; the local address of a connection never changes.
        host = self._host
        if host is None:
            host = self._host = self.transport.getHost()
        return host

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None:
            peer = self._peer = self.transport.getPeer()
        return peer

    def isSecure(self) -> bool:
        return self._secure

    def connectionLost(self, reason: Any) -> None:
        self.connected = 0
        self.state = CLOSED
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
        self.setTimeout(None)
        for request in self.requests:
            request.connectionLost(reason)
        aborting, self._aborting = self._aborting, None
        if aborting is not None:
            cancel(aborting)

    # --- what the client sends

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.from_client(data)
            return
        if self.h2 is not None:
            self.h2.dataReceived(data)
            return
        if self.discarding or self.state == CLOSED:
            return
        if not self._alpn_checked:
            # The first bytes arrive after the TLS handshake, so ALPN is settled.
            self._alpn_checked = True
            if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                self._switch_to_h2().dataReceived(data)
                return
        self.resetTimeout()
        buffer = self.buffer
        self.buffer = buffer + data if buffer else data
        if self.state == BUSY:
            self._hold_back()
        elif not self._parsing:
            self._parse()

    def _parse(self) -> None:
        """Parse what is buffered while the state allows; re-entrant calls (an answer
        finished while its request is parsed) leave the work to the loop running."""
        self._parsing = True
        try:
            while self.buffer and not self.discarding:
                state = self.state
                if state == HEAD:
                    if not self._head():
                        break
                elif state == BODY:
                    data = self.buffer
                    self.buffer = b""
                    self._body(data)
                else:
                    if state == BUSY:
                        self._hold_back()
                    break
        finally:
            self._parsing = False

    def _hold_back(self) -> None:
        """A request is being answered: what follows waits; past :data:`EAGER_READ`
        the client is not read until it is answered (twisted.web does the same)."""
        if (
            len(self.buffer) > EAGER_READ and not self._waiting_for_transport
            and not self._reading_paused
        ):
            self._reading_paused = True
            self._network.pauseProducing()

    def _head(self) -> bool:
        """Parse a whole head if one is buffered; False: wait for more (or dropped)."""
        buffer = self.buffer
        if buffer[:2] == b"\r\n" and self._blank_allowed:
            # One empty line before a request line is tolerated (twisted.web's rule,
            # for clients that end a body with an extra CRLF).
            self._blank_allowed = False
            buffer = self.buffer = buffer[2:]
            self._scanned = 0
            if not buffer:
                return False
        end = buffer.find(b"\r\n\r\n", self._scanned)
        if end < 0:
            size = len(buffer)
            if buffer[:2] == b"\r\n":
                self._malformed()  # an empty request line
            elif size > MAX_LINE and size - self._checked >= CHECK_EVERY:
                # Over the limits already?  Asked again only every few KiB: a client
                # trickling a huge head costs a split of it per check, not per read.
                self._checked = size
                lines = buffer.split(b"\r\n")
                tail = lines.pop()
                if not lines_within_limits(lines, len(tail)):
                    self._malformed()
            if buffer[:1] != b"\r":
                self._blank_allowed = False
            self._scanned = max(size - 3, 0)
            return False
        self._scanned = 0
        self._checked = 0
        self.buffer = buffer[end + 4:]
        self._blank_allowed = True
        head = buffer[:end]
        lines = head.split(b"\r\n")
        if end > MAX_LINE and not lines_within_limits(lines, 0):
            self._malformed()
            return False
        self._head_parsed(head, lines)
        return True

    def _head_parsed(self, head: bytes, lines: list[bytes]) -> None:
        """The request line, the headers, then processing from the headers on."""
        request = self.requestFactory(self, 0)
        self.requests.append(request)
        request_line = lines[0]
        try:
            command, path, version = parse_request_line(request_line)
        except ValueError:
            self._malformed()
            return
        headers: Headers = request.requestHeaders
        if b"\r\n " in head or b"\r\n\t" in head:
            if not self._headers(headers, unfold(lines[1:]), None):
                return
        else:
            block = head[len(request_line) + 2:]
            request.header_block = block
            if not self._headers(headers, lines[1:], block):
                return
        self._cancel_head_timer()
        request.head = (command, path, version)
        parse_cookies(header_values(headers, b"cookie"), request.received_cookies)
        self.persistent = self._persists(request, headers, version)
        chunked = self._chunked
        length: int | None = None if chunked is not None else self._remaining
        request.gotLength(length)
        expect = header_values(headers, b"expect")
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            self.transport.write(_CONTINUE)
        self.state = BODY
        request.begin()
        if length == 0 and self.state == BODY:
            self._content_received()

    def _headers(self, headers: Headers, lines: list[bytes], block: bytes | None) -> bool:
        """Add the header lines to ``headers``, choosing the body's framing; False: the
        request was malformed and is dropped.

        twisted.web's checks, in the same order of consequence: a line without a colon,
        a name that is not a token, a value with NUL, CR or LF, a framing header that is
        not a plain decimal ``Content-Length`` or exactly ``chunked``, a second framing
        header, more than :data:`MAX_HEADERS` headers.  A ``block`` of header lines
        parsed before without a framing header gives the same headers again:
        they are copied from :data:`_PARSED_HEADERS` (docs/performance.md).
        """
        self._remaining = 0
        self._chunked = None
        if block is not None:
            remembered = _PARSED_HEADERS.get(block) if HEADERS_DICT else None
            if remembered is not None:
                headers._rawHeaders = {name: list(values) for name, values in remembered[1]}
                return True
        add = headers.addRawHeader
        count = 0
        framed = False
        for line in lines:
            name, colon, value = line.partition(b":")
            value = value.strip(b" \t")
            if not colon or b"\x00" in value or b"\r" in value or b"\n" in value:
                self._malformed()
                return False
            lower = name.lower()
            if lower == _CONTENT_LENGTH or lower == _TRANSFER_ENCODING:
                if framed or not self._framing(lower, value):
                    self._malformed()
                    return False
                framed = True
            try:
                add(name, value)
            except InvalidHeaderName:
                self._malformed()
                return False
            count += 1
            if count > MAX_HEADERS:
                self._malformed()
                return False
        if (
            HEADERS_DICT and block is not None and not framed
            and len(block) <= _MAX_REMEMBERED_BLOCK
        ):
            parsed = tuple((name, tuple(values)) for name, values in headers._rawHeaders.items())
            remember(_PARSED_HEADERS, block, (count, parsed), _MAX_REMEMBERED_BLOCKS)
        return True

    def _framing(self, lower: bytes, value: bytes) -> bool:
        """The body's framing from its header; False: refused.

        ``Content-Length`` must be decimal digits only (no sign, no list); the only
        transfer coding a request may declare is exactly ``chunked`` — twisted.web
        ignores ``identity`` and would read the body as the next request.
        """
        if lower == _CONTENT_LENGTH:
            if not value.isdigit():
                return False
            self._remaining = int(value)
            return True
        if value.lower() != b"chunked":
            return False
        request = self.requests[-1]
        self._chunked = BoundedChunkedDecoder(request.handleContentChunk, self._body_done)
        return True

    def _persists(self, request: Any, headers: Headers, version: bytes) -> bool:
        """twisted.web's rule: HTTP/1.1 stays open unless the first ``Connection``
        header, split at spaces, says ``close`` (then the response says so too); older
        versions close."""
        if version != b"HTTP/1.1":
            return False
        connection = header_values(headers, b"connection")
        if connection and b"close" in [t.lower() for t in connection[0].split(b" ")]:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True

    def _body(self, data: bytes) -> None:
        chunked = self._chunked
        if chunked is not None:
            try:
                chunked.dataReceived(data)
            except _MalformedChunkedDataError:
                self._malformed()
            return
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            self.requests[-1].handleContentChunk(data)
            return
        self._remaining = 0
        self.requests[-1].handleContentChunk(data[:remaining])
        self._body_done(data[remaining:])

    def _body_done(self, rest: bytes) -> None:
        """The body is complete; ``rest`` belongs to the next request."""
        self._chunked = None
        if rest:
            buffer = self.buffer
            self.buffer = rest + buffer if buffer else rest
        self._content_received()

    def _content_received(self) -> None:
        if self.discarding or not self.requests:
            # An early answer (which closes the connection) already ended this request
            # while its last body bytes were being parsed: nothing is left to complete.
            return
        self.state = BUSY
        # No idle limit while the answer is prepared, however long that takes.
        if self.timeOut:
            self._saved_timeout = self.setTimeout(None)
        request = self.requests[-1]
        command, path, version = request.head
        request.requestReceived(command, path, version)

    def requestDone(self, request: Any) -> None:
        """The request's answer is complete (called by the request's ``finish``)."""
        requests = self.requests
        if not requests or request is not requests[0]:
            raise TypeError("not the request being answered")
        if self.relay is None:
            # Armed before the next pipelined request is parsed, which cancels it again.
            self._arm_head_timer()
        del requests[0]
        if self._reading_paused and not self._waiting_for_transport:
            self._reading_paused = False
            self._network.resumeProducing()
        if not self.persistent:
            self.state = CLOSED
            self.loseConnection()
            return
        if self.relay is not None or self.state == CLOSED:
            return
        self.state = HEAD
        saved, self._saved_timeout = self._saved_timeout, None
        if saved:
            self.setTimeout(saved)
        if self.buffer and not self._parsing:
            self._parse()

    def _malformed(self) -> None:
        """Drop the connection without an answer (the reference does the same for a
        malformed request, docs/security.md); it counts as a failure of its client."""
        if self.discarding:
            return
        if not self.requests:
            self.requests.append(self.requestFactory(self, 0))
        on_malformed = getattr(self.site, "on_malformed", None)
        if on_malformed is not None:
            on_malformed(self.requests[-1])
        self.discarding = True
        self.state = CLOSED
        self.buffer = b""
        if self.transport is not None:
            self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's name for :meth:`_malformed`, which its request calls on a
        form body it cannot parse."""
        self._malformed()

    def body_too_slow(self, answered: bool) -> None:
        """Cut a request whose body trickles in (``MIN_BODY_RATE`` in harp.web.site)."""
        self.discarding = True
        self.state = CLOSED
        if self.transport is None:
            return
        if not answered:
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def hand_over(self, relay: Relay) -> None:
        """Stop speaking HTTP: every further byte, and those buffered, belong to *relay*.

        The relay's idle limit replaces the channel's timeouts: an idle WebSocket must
        not be cut at ``HP_TIMEOUT_CLIENT``.
        """
        self._cancel_head_timer()
        self.setTimeout(None)
        self._saved_timeout = None
        self.relay = relay
        buffered = self.buffer
        self.buffer = b""
        if self._reading_paused:
            self._reading_paused = False
            self._network.resumeProducing()
        if buffered:
            relay.from_client(buffered)

    def _switch_to_h2(self) -> HarpH2Connection:
        """Hand the connection to HTTP/2 (:mod:`harp.web.h2`) before any HTTP/1.1 parsing."""
        self._cancel_head_timer()
        self.setTimeout(None)
        network = self._network  # the TLS transport
        network.unregisterProducer()
        site = self.site
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

    # --- what the request writes (twisted.web's channel interface)

    def writeHeaders(self, version: Any, code: Any, reason: Any, headers: Any) -> None:
        """twisted.web's head, with a ``Date`` (added here, so a relayed head that has
        the upstream's own never pays for setting HaRP's first)."""
        if not isinstance(headers, Headers):
            sanitized = Headers()
            for name, value in headers:
                sanitized.addRawHeader(name, value)
            headers = sanitized
        if not headers.hasHeader(b"date"):
            headers.setRawHeaders(b"date", [http_date()])
        sequence = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                sequence.extend((name, b": ", value, b"\r\n"))
        sequence.append(b"\r\n")
        self.transport.write(b"".join(sequence))

    # What requests pass here is theirs to type (twisted.web passes tuples to
    # writeSequence, ints as flags): the compiled signatures take any object.

    def write(self, data: Any) -> None:
        self.transport.write(data)

    def writeSequence(self, data: Any) -> None:
        self.transport.writeSequence(data)

    def loseConnection(self) -> None:
        self._network.unregisterProducer()
        self.transport.loseConnection()

    def registerProducer(self, producer: Any, streaming: object) -> None:
        if self._producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer}, because producer {self._producer} "
                "was never unregistered."
            )
        if not streaming:
            producer = _PullToPush(producer, self)
        self._producer = producer
        self._producer_streaming = bool(streaming)
        if not streaming:
            producer.startStreaming()

    def unregisterProducer(self) -> None:
        producer = self._producer
        if producer is None:
            return
        if not self._producer_streaming:
            producer.stopStreaming()
        self._producer = None
        self._producer_streaming = False

    # --- the transport's back-pressure (the channel is its push producer)

    def pauseProducing(self) -> None:
        """The client does not take the answer as fast as it comes: pause the answer's
        producer, and stop reading further requests meanwhile."""
        self._waiting_for_transport = True
        if self._producer is not None:
            self._producer.pauseProducing()
        if self.state != BUSY and not self._reading_paused:
            self._reading_paused = True
            self._network.pauseProducing()

    def resumeProducing(self) -> None:
        self._waiting_for_transport = False
        if self._producer is not None:
            self._producer.resumeProducing()
        if self._reading_paused and (self.state != BUSY or len(self.buffer) <= EAGER_READ):
            self._reading_paused = False
            self._network.resumeProducing()

    def stopProducing(self) -> None:
        if self._producer is not None:
            self._producer.stopProducing()

    # --- time limits.  Both are coarse deadlines (harp/deadlines.py), reused across the
    # requests of a connection: seconds-long limits set and unset around every request
    # would otherwise be a reactor timer created and cancelled each time.

    def setTimeout(self, period: float | None) -> float | None:
        """The idle limit (Twisted's ``TimeoutMixin`` interface); returns the previous."""
        previous = self.timeOut
        self.timeOut = period
        if period is None:
            cancel(self._idle)
        else:
            self._idle = deadlines_for(self.clock).rearm(self._idle, period, self._idle_timed_out)
        return previous

    def resetTimeout(self) -> None:
        idle = self._idle
        period = self.timeOut
        if idle is not None and period is not None and idle.action is not None:
            idle.reset(period)

    def _idle_timed_out(self) -> None:
        if self.transport is None:
            return
        log.debug("closing an idle client connection")
        self._aborting = self.clock.callLater(ABORT_AFTER, self._abort)
        self.state = CLOSED
        self.loseConnection()

    def _abort(self) -> None:
        self._aborting = None
        self.transport.abortConnection()

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
        self.state = CLOSED
        if self.requests or self.buffer.find(b"\r\n") > 0:
            # A request line came but its head did not complete: slow or broken client.
            self.transport.write(_TIMEOUT_RESPONSE)
        # Otherwise an idle keep-alive connection, or bytes that never made a request
        # line (TLS spoken to the HTTP port, say): closed quietly.
        self.transport.loseConnection()
