"""HTTP/2 on the HTTPS frontend: Twisted's ``H2Connection``, bounded and streaming.

A TLS client that negotiates ``h2`` by ALPN (:mod:`harp.tlsctx`) has its connection
handed from :class:`~harp.web.channel.HarpChannel` to a :class:`HarpH2Connection`; every
stream then carries one :class:`~harp.web.site.HarpRequest` through the same pipeline,
proxy and access log as an HTTP/1.1 request.  What this module changes in Twisted's
implementation, and why (docs/security.md#http2):

- **Decide on headers, stream the body.**  Twisted's ``H2Stream`` renders a request
  only when its body is complete; :class:`HarpH2Stream` starts the pipeline as soon as
  the header block is in, like the HTTP/1.1 channel, and pauses the stream (its flow
  control window stays closed) while the upstream is slower than the client.
- **Header rules of the HTTP/1.1 side.**  The same head size (16 KiB) as
  ``twisted.web``'s HTTP/1.1 parser (which also bounds the count of fields, as HPACK
  charges 32 bytes for each); ``:authority`` becomes ``Host`` and a
  ``Host`` that disagrees with it is malformed; HTTP/2 cookie crumbs are joined into one
  ``Cookie`` line for the HTTP/1.1 upstream (RFC 9113 §8.2.3).  Connection-specific
  headers never reach the upstream (the h2 package refuses them in requests) nor the
  client (dropped from responses here, where h2 would raise).
- **Bounds against HTTP/2-specific abuse.**  At most :data:`MAX_CONCURRENT_STREAMS`
  streams; rapid reset (CVE-2023-44487) is met with a token bucket of its own
  (:data:`RESET_BURST`, :data:`RESET_RATE`) and ``GOAWAY ENHANCE_YOUR_CALM``;
  CONTINUATION floods and HPACK bombs are cut by the h2 package (64 CONTINUATION frames
  at most, the decoded header list checked against our limit, the HPACK table at the
  default 4 KiB); client PRIORITY frames are ignored, so they cannot grow a priority
  tree; at most :data:`STREAM_SEND_BUFFER` bytes wait per stream, however large a
  window the client advertises while not reading.
- **Timeouts.**  A connection without open streams is closed after
  ``HP_TIMEOUT_CLIENT`` whatever it sends (PINGs keep an idle HTTP/2 connection alive
  for Twisted's own idle timer); while a stream is open the upstream timeout and the
  body-rate check of :class:`~harp.web.site.HarpRequest` govern, as for HTTP/1.1.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import h2.errors
import h2.exceptions
import h2.settings
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import _http2
from zope.interface import directlyProvides, providedBy

from harp.credentials import parse_cookies
from harp.logs import HarpLogger
from harp.timers import cancel
from harp.web.headers import header_values, http_date

log = HarpLogger("harp.h2")

#: SETTINGS_MAX_CONCURRENT_STREAMS: open requests per connection (as nginx and Go).
MAX_CONCURRENT_STREAMS: Final = 100
#: SETTINGS_MAX_HEADER_LIST_SIZE, the decoded header block: ``twisted.web``'s HTTP/1.1
#: limit for a request head (``HTTPChannel.totalHeadersSize``).
MAX_HEADER_LIST_SIZE: Final = 16384
#: Peer stream resets allowed in a burst, and refilled per second.  Browsers reset a
#: few streams when the user navigates away; a rapid-reset attack sends thousands.
RESET_BURST: Final = 200
RESET_RATE: Final = 33.0
#: Response bytes queued per stream before its producer (the upstream) is paused.
STREAM_SEND_BUFFER: Final = 128 * 1024
#: Connection-specific fields an HTTP/2 response must not carry (RFC 9113 §8.2.2).
_RESPONSE_REFUSED: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
})


#: RFC 9110 ``tchar``: what a method may consist of.  The h2 package refuses control
#: bytes, CR and LF in every field, but a ``:method`` with a space would still break the
#: HTTP/1.1 request line sent upstream.
_TCHAR: Final = b"!#$%&'*+-.^_`|~0123456789" + bytes(range(0x41, 0x5B)) + bytes(range(0x61, 0x7B))


def _settings() -> h2.settings.Settings:
    codes = h2.settings.SettingCodes
    return h2.settings.Settings(client=False, initial_values={
        codes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
        codes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
    })


class HarpH2Connection(_http2.H2Connection):  # type: ignore[misc]
    """One HTTP/2 connection: Twisted's, with HaRP's streams and bounds."""

    #: Told of each malformed request before its stream is reset (counted for bans).
    on_malformed: Callable[[Any], None] | None = None
    #: Set by the channel that hands the connection over (the site's request class).
    requestFactory: Any = None
    _idle_timer: IDelayedCall | None = None
    _host: Any = None

    def __init__(self, clock: IReactorTime, head_timeout: float) -> None:
        super().__init__(clock)
        self.clock = clock
        self.head_timeout = head_timeout
        self.conn.local_settings = _settings()
        self.conn.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        #: Streams whose producer is paused by :data:`STREAM_SEND_BUFFER`.
        self._capped: set[int] = set()
        self._reset_tokens = float(RESET_BURST)
        self._reset_stamp = time.monotonic()
        # Twisted's idle timer is replaced by the no-stream deadline below.
        self.timeOut = None

    # --- lifecycle

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(_ClosingTransport(transport))

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_idle_timer()

    #: GOAWAY sent by us: what still arrives is not read (h2 would answer it with a
    #: second, PROTOCOL_ERROR, GOAWAY).
    _closing = False

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            super().dataReceived(data)
        except Exception:
            # A bug must cost this connection, never the reactor or other clients.
            log.failure("HTTP/2 connection failed", Failure())
            transport: Any = self.transport
            if transport is not None:
                transport.abortConnection()

    def connectionLost(
        self, reason: Failure = connectionDone, _cancelTimeouts: bool = True
    ) -> None:
        self._cancel_idle_timer()
        super().connectionLost(reason, _cancelTimeouts=_cancelTimeouts)

    def getHost(self) -> Any:
        # Asked for every request; the local address of a connection never changes.
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    # --- no-stream deadline (the HTTP/1.1 channel's head timer)

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        if self.head_timeout and self._stillProducing:
            self._idle_timer = self.clock.callLater(self.head_timeout, self._idle_timed_out)

    def _cancel_idle_timer(self) -> None:
        cancel(self._idle_timer)
        self._idle_timer = None

    def _idle_timed_out(self) -> None:
        self._idle_timer = None
        if self.transport is None or self.streams:
            return
        self._closing = True
        self.conn.close_connection()
        self._tryToWriteControlData()
        self._abortingCall = self.clock.callLater(self.abortTimeout, self.forceAbortClient)
        self.transport.loseConnection()

    # --- streams

    def _requestReceived(self, event: Any) -> None:
        if not self._stillProducing:
            return  # closed (e.g. a reset flood) while this batch of frames was parsed
        stream_id: int = event.stream_id
        stream = HarpH2Stream(
            stream_id, self, event.headers, self.requestFactory, self.site, self.factory
        )
        self.streams[stream_id] = stream
        self._streamCleanupCallbacks[stream_id] = Deferred()
        self._outboundStreamQueues[stream_id] = deque()
        self.priority.insert_stream(stream_id)
        self.priority.block(stream_id)
        self._cancel_idle_timer()
        stream.start(ended=event.stream_ended is not None)

    def _requestDataReceived(self, event: Any) -> None:
        if event.stream_id in self.streams:
            super()._requestDataReceived(event)
        elif event.flow_controlled_length:
            # Data for a stream we already answered: give the connection window back.
            self.openStreamWindow(event.stream_id, event.flow_controlled_length)

    def _requestEnded(self, event: Any) -> None:
        if event.stream_id in self.streams:
            super()._requestEnded(event)

    def _requestAborted(self, event: Any) -> None:
        if event.stream_id not in self.streams:
            return
        stream = self.streams[event.stream_id]
        stream.remote_ended = True  # closed by the client: nothing to reset on our side
        stream.connectionLost(
            Failure(ConnectionLost(f"stream reset by the client ({event.error_code})"))
        )
        self._requestDone(event.stream_id)
        if not self._spend_reset_token():
            log.info("HTTP/2 client reset too many streams: closing")
            if self.on_malformed is not None:
                # One failure of its client (as a malformed HTTP/1.1 request), charged
                # through the last request so that trusted proxies are honoured.
                self.on_malformed(stream._request)
            self._closing = True
            self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            self._tryToWriteControlData()
            if self.transport is not None:
                self.transport.loseConnection()
            # Timers stay armed: a client that does not read the GOAWAY is still cut.
            self.connectionLost(Failure(ConnectionLost("too many stream resets")),
                                _cancelTimeouts=False)

    def _spend_reset_token(self) -> bool:
        now = time.monotonic()
        tokens = min(RESET_BURST, self._reset_tokens + (now - self._reset_stamp) * RESET_RATE)
        self._reset_stamp = now
        if tokens < 1:
            self._reset_tokens = tokens
            return False
        self._reset_tokens = tokens - 1
        return True

    def _handlePriorityUpdate(self, event: Any) -> None:
        # RFC 9113 deprecates the priority tree; following a client's tree would let it
        # insert entries for streams that never open.
        return

    def _requestDone(self, streamID: int) -> None:
        stream = self.streams.get(streamID)
        super()._requestDone(streamID)
        self._capped.discard(streamID)
        if isinstance(stream, HarpH2Stream) and not stream.remote_ended:
            # Answered before the request body ended (an early 403 to an upload): ask the
            # client to stop sending it, without error (RFC 9113 §8.1).
            try:
                self.conn.reset_stream(streamID, h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.H2Error:
                pass
            else:
                self._tryToWriteControlData()
        if not self.streams:
            self._arm_idle_timer()

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: list[tuple[bytes, bytes]],
        streamID: int,
    ) -> None:
        kept = [(name, value) for name, value in headers
                if name.lower() not in _RESPONSE_REFUSED]
        if not any(name.lower() == b"date" for name, _ in kept):
            kept.append((b"date", http_date()))
        super().writeHeaders(version, code, reason, kept, streamID)

    # --- bounded send queues

    def remainingOutboundWindow(self, streamID: int) -> int:
        window = min(self.conn.local_flow_control_window(streamID), STREAM_SEND_BUFFER)
        queued = sum(
            len(chunk) for chunk in self._outboundStreamQueues[streamID]
            if chunk is not _http2._END_STREAM_SENTINEL
        )
        return int(window - queued)

    def _sendPrioritisedData(self, *args: Any) -> None:
        super()._sendPrioritisedData(*args)
        if self._capped:
            # A stream paused by the send-buffer cap wakes up when its queue drains, not
            # only on a WINDOW_UPDATE (which a large window never needs).
            for stream_id in list(self._capped):
                stream = self.streams.get(stream_id)
                if stream is None:
                    self._capped.discard(stream_id)
                elif self.remainingOutboundWindow(stream_id) > 0:
                    self._capped.discard(stream_id)
                    stream.windowUpdated()


class _ClosingTransport:
    """The TLS transport as the h2 connection sees it.

    The h2 connection is the transport's registered producer, and a TLS transport waits
    for its producer to go before it closes; Twisted's ``H2Connection`` never
    unregisters, so its GOAWAY-and-close would leave the connection open.  Closing
    through this wrapper unregisters first.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._registered = True  # by the channel that handed the connection over
        self.write = transport.write  # the hot path, without __getattr__
        directlyProvides(self, providedBy(transport))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._transport.unregisterProducer()

    def loseConnection(self) -> None:
        self._unregister()
        self._transport.loseConnection()

    def abortConnection(self) -> None:
        self._unregister()
        self._transport.abortConnection()


class HarpH2Stream(_http2.H2Stream):  # type: ignore[misc]
    """One request stream, processed from its headers on (see the module docstring)."""

    _conn: HarpH2Connection
    #: The client ended its side (the whole request body arrived).
    remote_ended = False
    malformed = False
    _authority: bytes | None = None

    @property
    def head_timeout(self) -> float:
        return self._conn.head_timeout

    @property
    def clock(self) -> IReactorTime:
        return self._conn.clock

    def _convertHeaders(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Fill the request's headers; length and processing wait for :meth:`start`.

        No count limit of its own: HPACK charges 32 bytes per field, so
        :data:`MAX_HEADER_LIST_SIZE` admits fewer than the 500 fields of HTTP/1.1.
        """
        out = self._request.requestHeaders
        hosts: list[bytes] = []
        cookies: list[bytes] = []
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    self.command = value
                elif name == b":path":
                    self.path = value
                elif name == b":authority":
                    self._authority = value
            elif name == b"host":
                hosts.append(value)
            elif name == b"cookie":
                cookies.append(value)
            else:
                out.addRawHeader(name, value)
        authority = self._authority
        if authority is not None:
            if any(host != authority for host in hosts):
                self.malformed = True
            hosts = [authority]
        if len(hosts) > 1:
            self.malformed = True
        if hosts:
            out.setRawHeaders(b"host", hosts[:1])
        if cookies:
            out.setRawHeaders(b"cookie", [b"; ".join(cookies)])

    def start(self, ended: bool) -> None:
        """The stream is registered with its connection: hand the request to the site."""
        request = self._request
        lengths = request.requestHeaders.getRawHeaders(b"content-length")
        length: int | None = None
        if lengths is not None:
            # The h2 package checks the DATA it receives against this value.
            if len(lengths) != 1 or not lengths[0].isdigit():
                self.malformed = True
            else:
                length = int(lengths[0])
        elif ended:
            length = 0
        command = self.command
        if command is None or not command or command.translate(None, _TCHAR):
            self.malformed = True
        if self.malformed:
            self.malformed = True
            on_malformed = self._conn.on_malformed
            if on_malformed is not None:
                on_malformed(request)
            self.abortConnection()
            return
        request.gotLength(length)
        parse_cookies(header_values(request.requestHeaders, b"cookie"), request.received_cookies)
        expect = request.requestHeaders.getRawHeaders(b"expect")
        if expect and expect[0].lower() == b"100-continue" and length != 0:
            self._send100Continue()
        # CONNECT has no :path; its target is the authority (refused by the pipeline as
        # any target that is not origin-form, as for HTTP/1.1).
        target = self.path if self.path is not None else self._authority or b""
        request.head = (self.command, target, b"HTTP/2")
        request.begin()

    def requestComplete(self) -> None:
        self.remote_ended = True
        super().requestComplete()

    def flowControlBlocked(self) -> None:
        if self.producer is not None:
            self._conn._capped.add(self.streamID)
        super().flowControlBlocked()

    # --- what HarpRequest asks of its channel

    def body_too_slow(self, answered: bool) -> None:
        """Cut a request whose body trickles in: reset this stream only."""
        self.abortConnection()

    def abortConnection(self) -> None:
        """Reset the stream and tell the request, as a lost TCP connection would."""
        conn = self._conn
        if self.streamID not in conn.streams:
            return
        self.remote_ended = True  # no second (NO_ERROR) reset after this one
        if not self.malformed:
            self._request.connectionLost(Failure(ConnectionAborted("stream reset")))
        try:
            conn.abortRequest(self.streamID)
        except h2.exceptions.StreamClosedError:
            conn._requestDone(self.streamID)
