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
- **Tunnels.**  After an ``Upgrade`` (WebSocket) the channel stops parsing HTTP and
  hands every byte to the tunnel.

The channel's private ``_command``/``_path``/``_version`` are read once, in
``allHeadersReceived``: that is the only place the request line is known before the
body, and these attributes have kept their names across Twisted releases.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from harp import logs
from harp.logs import HarpLogger
from harp.metrics import Metrics
from harp.web.body import BodyPipe

log = HarpLogger("harp.access")

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n"
    b"connection: close\r\n\r\n408 Request Timeout"
)


class Tunnel(Protocol):
    """An upgraded connection's relay (see :mod:`harp.web.tunnel`)."""

    def client_data(self, data: bytes) -> None: ...

    def client_lost(self) -> None: ...


class HarpChannel(http.HTTPChannel):
    head_timeout: float = 30.0
    clock: IReactorTime = _reactor  # type: ignore[assignment]
    tunnel: Tunnel | None = None
    discarding = False
    _head_timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_head_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.client_data(data)
        elif not self.discarding:
            super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        # Body bytes that arrive in the same segment as the headers come here directly,
        # not through dataReceived.
        if not self.discarding:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_head_timer()
        request = self.requests[-1]
        request.head = (self._command, self._path, self._version)
        super().allHeadersReceived()
        request.begin()

    def requestDone(self, request: http.Request) -> None:
        # Armed before the parent parses any pipelined request, which cancels it again.
        if self.tunnel is None:
            self._arm_head_timer()
        super().requestDone(request)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_head_timer()
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.client_lost()
        super().connectionLost(reason)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # The reference answers a malformed request (bad request line, oversized or
        # broken headers) with a silent drop, not a 400 (reference-behaviour §3.1).
        self.discarding = True
        if self.transport is not None:
            self.transport.loseConnection()

    def become_tunnel(self, tunnel: Tunnel) -> None:
        """Stop speaking HTTP: every further byte belongs to ``tunnel``."""
        self._cancel_head_timer()
        self.setTimeout(None)
        self._savedTimeOut = None
        self.tunnel = tunnel
        buffered = b"".join(self._dataBuffer)
        self._dataBuffer = []
        if buffered:
            tunnel.client_data(buffered)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if self.head_timeout:
            self._head_timer = self.clock.callLater(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _head_timed_out(self) -> None:
        self._head_timer = None
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
    body: BodyPipe | None = None
    has_body = False
    body_complete = False
    closing_early = False
    _finish_pending = False
    started: float = 0.0
    app_id: str = "-"
    note: str = ""
    # A proxied response without Content-Type must stay without one.
    defaultContentType = None

    def gotLength(self, length: int | None) -> None:
        # No super(): it would create the buffer (BytesIO or temp file) we avoid.
        self.content = None
        self.has_body = length is None or length > 0
        self.body = BodyPipe(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        assert self.body is not None
        self.body.write(data)

    def begin(self) -> None:
        """Headers complete: set up what ``requestReceived`` would, then process."""
        assert self.head is not None
        self.started = time.monotonic()
        command, uri, version = self.head
        self.method, self.uri, self.clientproto = command, uri, version
        self.path = uri.split(b"?", 1)[0]
        self.args = {}
        self.process()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """Called by the channel when the body is complete (processing began earlier)."""
        self.body_complete = True
        if self.body is not None:
            self.body.finish()
        if self._finish_pending:
            self._finish_pending = False
            super().finish()

    def finish(self) -> None:
        if not self.body_complete and not self.closing_early and not self._disconnected:
            self._finish_pending = True
            return
        super().finish()

    def close_early(self) -> None:
        """Answer before the client sent all of its body: close after the response."""
        if self.body_complete or not self.has_body:
            return
        self.closing_early = True
        if not self.startedWriting:
            self.setHeader(b"connection", b"close")
        channel = self.channel
        if isinstance(channel, HarpChannel):
            channel.persistent = False
            channel.discarding = True
        if self.body is not None:
            self.body.discard()

    def render(self, resrc: Resource) -> None:
        # twisted.web announces itself; a reverse proxy should not.
        self.responseHeaders.removeHeader(b"server")
        super().render(resrc)

    # FlowControl for the BodyPipe: pause reading from the client.

    def pause_client(self) -> None:
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume_client(self) -> None:
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.resumeProducing()  # type: ignore[attr-defined]


class HarpSite(Site):
    """A Site whose access log is one line at info level, without secrets or query."""

    requestFactory = HarpRequest
    protocol = HarpChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(
        self, resource: Resource, head_timeout: float, metrics: Metrics | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.head_timeout = head_timeout
        self.metrics = metrics or Metrics()

    def buildProtocol(self, addr: Any) -> HarpChannel:  # type: ignore[override]
        channel: HarpChannel = super().buildProtocol(addr)
        channel.head_timeout = self.head_timeout
        return channel

    def log(self, request: http.Request) -> None:
        if not isinstance(request, HarpRequest):
            return
        elapsed = time.monotonic() - request.started
        if request.note:
            self.metrics.drop(request.note)
        else:
            self.metrics.response(request.code, elapsed)
        if not logs.enabled(LogLevel.info):
            return
        client = request.getClientAddress()
        log.info(
            "{client} {method} {path} {status} app={app} {ms:.1f}ms{note}",
            client=getattr(client, "host", "-"),
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            status="drop" if request.note else request.code,
            app=request.app_id,
            ms=elapsed * 1000,
            note=f" ({request.note})" if request.note else "",
        )
