"""The HTTP server side's request and site, adapted for a streaming proxy.

The channel (one client connection) is HaRP's own, :mod:`harp.web.channel`.  Around it,
two changes to ``twisted.web``'s defaults, each for a reverse proxy's needs:

- **Decide on headers, stream the body.**  twisted.web processes a request only once
  its whole body has arrived and been buffered.  The channel starts processing right
  after the headers (:meth:`HarpRequest.begin`), and :class:`HarpRequest` feeds the body
  into a :class:`~harp.web.body.BodyPipe` instead of a temporary file.  ``finish()`` is
  held back until the body is complete, because the channel answers one request at a
  time; an answer given before the client finished sending (e.g. a 403 to a big upload)
  closes the connection instead.
- **One access line per request**, without secrets or query (:meth:`HarpSite.log`).

HTTP/2 streams (:mod:`harp.web.h2`) make the same ``HarpRequest`` objects.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol as BaseProtocol
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from harp import logs
from harp.credentials import parse_cookies
from harp.logs import HarpLogger
from harp.metrics import Metrics
from harp.timers import cancel
from harp.web.body import BodyPipe
from harp.web.channel import HarpChannel
from harp.web.h2 import HarpH2Stream
from harp.web.headers import header_values
from harp.web.limits import ConnectionLimit
from harp.web.relayed_head import relayed_head

log = HarpLogger("harp.access")

#: Bytes per second a request body must sustain while HaRP is reading it, measured
#: over windows of ``HP_TIMEOUT_CLIENT`` (Apache's mod_reqtimeout uses the same idea).
MIN_BODY_RATE: Final = 500


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
        """twisted.web's cookie parse, compiled (:func:`harp.credentials.parse_cookies`).

        HaRP's channels call that function themselves; this is twisted.web's name for it.
        """
        parse_cookies(header_values(self.requestHeaders, b"cookie"), self.received_cookies)

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
        # twisted.web's setResponseCode, written out: the reason is always given.
        self.code = status
        self.code_message = reason
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
        origin-form (twisted.web would answer it with a 405 of its own).  A root that
        serves every method and always answers later (``answers_later``, HaRP's own) is
        called directly, without twisted.web's ``render`` around it.
        """
        site = self.channel.site  # type: ignore[attr-defined]  # set by Site.buildProtocol
        self.site = site
        self.prepath = []
        self.postpath = []
        resource = site.resource
        try:
            if site.answers_later:
                resource.render(self)
            else:
                self.render(resource)
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
            self._finish_now()

    def finish(self) -> None:
        if not self.body_complete and not self.closing_early and not self._disconnected:
            self._finish_pending = True
            return
        if self._rate_timer is not None:
            self._cancel_rate_check()
        self._finish_now()

    def _finish_now(self) -> None:
        """twisted.web's ``finish`` (server's and http's) and its ``_cleanup``, in one call.

        Why: the three were ≈ 5 % of a small request's Python, mostly the calls.  The
        same steps in the same order: refuse after a lost connection, warn on a second
        finish, write the head if nothing was written, end a chunked body, write the
        access line, mark finished, then hand the connection back to the channel, close
        the content and fire the ``notifyFinish`` Deferreds.  An encoder's flush
        (twisted.web.server's only addition) goes the long way.
        """
        if self._encoder is not None:
            super().finish()
            return
        if self._disconnected:
            raise RuntimeError(
                "Request.finish called on a request after its connection was lost; "
                "use Request.notifyFinish to keep track of this."
            )
        if self.finished:
            warnings.warn("Warning! request.finish called twice.", stacklevel=3)
            return
        if not self.startedWriting:
            self.write(b"")
        channel = self.channel
        if self.chunked:
            channel.write(b"0\r\n\r\n")
        site = getattr(channel, "factory", None)
        if site is not None:
            site.log(self)
        self.finished = 1
        if self.queued:
            return
        if self.producer:
            self._log.failure(
                "", Failure(RuntimeError(f"Producer was not unregistered for {self.uri!r}"))
            )
            self.unregisterProducer()
        channel.requestDone(self)
        del self.channel
        content = self.content
        if content is not None:
            try:
                content.close()
            except OSError:
                pass
            del self.content
        notifications = self.notifications
        if notifications:
            for finished in notifications:
                finished.callback(None)
            self.notifications = []

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
        self.answers_later: bool = getattr(resource, "answers_later", False)
        self.head_timeout = head_timeout
        self.metrics = metrics or Metrics()
        self.limit = limit

    def buildProtocol(self, addr: Any) -> HarpChannel | _Refuse:  # type: ignore[override]
        limit = self.limit
        if limit is not None and not limit.try_open():
            return _Refuse()
        channel = HarpChannel(self, self.head_timeout, self.timeOut)
        channel.clock = self.reactor
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
