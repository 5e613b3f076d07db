"""Forwarding a decided request to its ExApp, and relaying the answer.

``twisted.web.proxy.ReverseProxyResource`` opens an HTTP/1.0 connection per request and
knows one fixed upstream.  :class:`ExAppProxy` keeps its place in the resource model
but replaces the client side: one HTTP/1.1 ``Agent`` over a persistent connection pool
and the :mod:`harp.web.upstream` endpoint factory, and a relay that streams the
response with backpressure (the upstream is paused while the client cannot take more).

Failures map to the statuses HAProxy gives in the reference: connect refused or timed
out → 503, no response within ``HP_TIMEOUT_SERVER`` → 504, an upstream that breaks
the response → 502 (or, mid-body, the client connection is aborted so a truncated body
never looks complete).  Upgrades go to :mod:`harp.web.upgrade`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, Final, cast

from mypy_extensions import mypyc_attr
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.iweb import IBodyProducer
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Request

from harp.deadlines import Deadline, deadlines_for
from harp.logs import HarpLogger
from harp.lru import remember
from harp.splice import socket_fd
from harp.web import responses
from harp.web.body import BodyPipe
from harp.web.channel import HarpChannel
from harp.web.exchange import ChunkedWriter, ConnectionPool, UpstreamConnection
from harp.web.headers import HOP_BY_HOP, connection_listed
from harp.web.response_head import ResponseHead
from harp.web.site import HarpRequest
from harp.web.upgrade import WebSocketUpgrade
from harp.web.upstream import EndpointFactory, UpstreamEndpoints, upstream_uri

log = HarpLogger("harp.proxy")

GATEWAY_TIMEOUT: Final = b"504 Gateway Timeout"
#: Headers only HaRP may read: the daemon's key and AppAPI's routing hints never
#: reach an ExApp (docs/security.md, "What an ExApp receives").
HARP_ONLY: Final = frozenset(
    {b"harp-shared-key", b"ex-app-host", b"ex-app-port", b"docker-engine-port"}
)
#: The identity headers HaRP sets on every proxied request (the client's are replaced).
IDENTITY: Final = frozenset(
    {b"ex-app-id", b"ex-app-version", b"authorization-app-api", b"aa-version"}
)
#: Request headers not copied upstream: hop-by-hop ones, the body framing (the Agent
#: writes its own from the streamed body), Expect (we answered 100 ourselves),
#: HaRP's own headers and the identity headers (set afresh).
_NOT_FORWARDED: Final = (
    HOP_BY_HOP | HARP_ONLY | IDENTITY | {b"content-length", b"expect"}
)
#: For an Upgrade the connection-level headers are the point and are kept.
_NOT_FORWARDED_UPGRADE: Final = (
    (HOP_BY_HOP - {b"connection", b"upgrade"}) | HARP_ONLY | IDENTITY | {b"expect"}
)
BAD_GATEWAY: Final = b"502 Bad Gateway"
#: Idle keep-alive connections kept per upstream (host, port).
MAX_IDLE_PER_UPSTREAM: Final = 512


class _Forward:
    """One request on its way upstream and its answer on the way back.

    Implements :class:`~harp.web.exchange.ExchangeHandler`.  Timers: until the response
    head arrives, ``HP_TIMEOUT_SERVER`` from the start (→ 504); then the same limit of
    silence between body bytes (→ the client connection is aborted, so a truncated
    body never looks complete).
    """

    __slots__ = (
        "body", "chunked", "conn", "finished", "head", "key", "method", "on_status",
        "proxy", "request", "retried", "timed_out", "timer", "unresolvable_status",
    )

    def __init__(
        self, proxy: ExAppProxy, request: Request, key: tuple[str, int], method: bytes,
        head: bytes, body: BodyPipe | None, chunked: bool,
        on_status: Callable[[int], None] | None,
        unresolvable_status: int,
    ) -> None:
        self.proxy = proxy
        self.request = request
        self.key = key
        self.method = method
        self.head = head
        self.body = body
        self.chunked = chunked
        self.on_status = on_status
        self.unresolvable_status = unresolvable_status
        self.conn: UpstreamConnection | None = None
        self.finished = False
        self.retried = False
        self.timed_out = False
        self.timer: Deadline | None = None

    def start(self) -> None:
        proxy = self.proxy
        self.timer = proxy.deadlines.call_later(proxy.server_timeout, self._timeout)
        cast(HarpRequest, self.request).on_lost = self._client_gone
        conn = proxy.pool.take(self.key)
        if conn is not None:
            self._send(conn)
        else:
            self._connect()

    def _connect(self) -> None:
        host, port = self.key
        endpoint = self.proxy.endpoints.endpointForURI(_uri(host, port))
        connecting = self.proxy.pool.connect(self.key, endpoint)
        connecting.addCallbacks(self._send, self._connect_failed)
        connecting.addErrback(self._bug)

    def _send(self, conn: UpstreamConnection) -> None:
        if self.finished:
            self.proxy.pool.release(conn)
            return
        self.conn = conn
        body = self.body
        conn.request_sent = body is None
        conn.start(self, self.method, self.head)
        if body is None:
            return
        transport: Any = conn.transport
        consumer: Any = ChunkedWriter(transport) if self.chunked else transport
        transport.registerProducer(body, True)
        sending = body.startProducing(consumer)

        def sent(_: object) -> None:
            if self.chunked:
                consumer.finish()
            if conn.transport is not None:
                conn.transport.unregisterProducer()  # type: ignore[attr-defined]
            conn.request_sent = True

        sending.addCallback(sent)
        sending.addErrback(lambda _: None)  # the exchange's own failure path reports

    def _connect_failed(self, failure: Failure) -> None:
        if self.finished:
            return
        host, port = self.key
        status = self.unresolvable_status
        if status and failure.check(DNSLookupError):
            cast(HarpRequest, self.request).detail = f"upstream host {host} does not resolve"
            self._end()
            if not responses.gone(self.request):
                responses.finish(self.request, responses.error(self.request, status))
            return
        # Said in the request's access line (docs/operations.md, "Logs").
        request = cast(HarpRequest, self.request)
        if failure.check(ConnectError, TimeoutError, CancelledError, DNSLookupError):
            request.detail = f"upstream {host}:{port} unreachable: {failure.getErrorMessage()}"
            self._fail_with(503, None)
        else:
            request.detail = f"upstream {host}:{port} failed: {failure.getErrorMessage()}"
            self._fail_with(502, BAD_GATEWAY)

    # --- ExchangeHandler

    def response_head(self, head: ResponseHead, whole: bool) -> None:
        if self.on_status is not None:
            self.on_status(head.status)
        request = self.request
        if self.finished or responses.gone(request):
            self._drop_upstream()
            return
        responses.relay_head(request, head)
        conn = self.conn
        # A slow client pauses the upstream's reads, unless there is nothing left to
        # read: a response whose body is in hand (most small ones) registers nothing
        # (two calls into twisted.web's producer bookkeeping per request, saved).
        if not whole and conn is not None and conn.transport is not None:
            request.registerProducer(conn.transport, True)

    def response_data(self, data: bytes) -> None:
        timer = self.timer
        if timer is not None:
            timer.reset(self.proxy.server_timeout)
        self.request.write(data)

    def response_done(self) -> None:
        if self.finished:
            return
        self._end()
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        if not responses.gone(request):
            request.finish()

    def exchange_failed(self, reason: str, before_response: bool) -> None:
        if self.finished:
            return
        conn = self.conn
        if (
            before_response and conn is not None and conn.reused and not conn.got_bytes
            and self.body is None and not self.retried
        ):
            # A kept-alive connection the upstream closed as we reused it: the request
            # never reached it, so sending it again on a new connection is safe.
            self.retried = True
            self.conn = None
            self._connect()
            return
        host, port = self.key
        cast(HarpRequest, self.request).detail = f"upstream {host}:{port} failed: {reason}"
        if before_response and not self.request.startedWriting:
            self._fail_with(502, BAD_GATEWAY)
        else:
            self._end()
            responses.abort(self.request)

    def splice_sink(self) -> Any:
        request = self.request
        if self.finished or responses.gone(request) or not isinstance(request, HarpRequest):
            return None
        channel = request.channel
        if not isinstance(channel, HarpChannel) or channel.relay is not None:
            return None
        sink = channel.transport
        if socket_fd(sink) is None:
            return None
        request.write(b"")  # the head, if it is still waiting for the first body bytes
        if request.chunked or request.method == b"HEAD" or responses.gone(request):
            return None
        if request.producer is not None:
            # The upstream's transport must not be resumed by the client's drains now.
            request.unregisterProducer()
        return sink

    def response_spliced(self, length: int) -> None:
        timer = self.timer
        if timer is not None:
            timer.reset(self.proxy.server_timeout)
        self.request.sentLength += length

    def splice_abandoned(self) -> None:
        request = self.request
        conn = self.conn
        if request.producer is None and conn is not None and conn.transport is not None:
            request.registerProducer(conn.transport, True)

    def client_failed(self, reason: str) -> None:
        if self.finished:
            return
        cast(HarpRequest, self.request).detail = reason
        self.conn = None
        self._end()
        responses.abort(self.request)

    # --- ends

    def _timeout(self) -> None:
        self.timer = None
        if self.finished:
            return
        self.timed_out = True
        self._drop_upstream()
        if self.request.startedWriting:
            cast(HarpRequest, self.request).detail = (
                f"upstream idle for {self.proxy.server_timeout:g}s mid-response"
            )
            self._end()
            responses.abort(self.request)
        else:
            cast(HarpRequest, self.request).detail = (
                f"no answer from the upstream within {self.proxy.server_timeout:g}s"
            )
            self._fail_with(504, GATEWAY_TIMEOUT)

    def _client_gone(self) -> None:
        if not self.finished:
            self._drop_upstream()
            self._end()

    def _drop_upstream(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.detach()

    def _fail_with(self, status: int, body: bytes | None) -> None:
        self._drop_upstream()
        self._end()
        if not responses.gone(self.request):
            self.proxy._reply(self.request, status, body)

    def _end(self) -> None:
        self.finished = True
        # The request no longer needs to tell this exchange it is gone; dropping the
        # link also leaves no request <-> exchange cycle for the garbage collector.
        cast(HarpRequest, self.request).on_lost = None
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()

    def _bug(self, failure: Failure) -> None:
        self._end()
        responses.internal_error(self.request, failure, log, "proxying failed")


def _request_line(request: Request, target: bytes) -> bytes:
    """``METHOD target HTTP/1.1``: ``target`` is the checked, normalised path (never the
    client's raw one) and the query is the client's."""
    _, _, query = request.uri.partition(b"?")
    path = target or b"/"
    if query:
        path = path + b"?" + query
    return b"%s %s HTTP/1.1" % (request.method, path)


def _header_lines(
    request: Request, drop: frozenset[bytes], listed: frozenset[bytes], host: bytes | None,
) -> list[bytes]:
    """The client's headers to pass on (one per line, unjoined).

    Headers named in ``drop`` or ``listed`` stay behind; ``host`` is the Host to send
    when the client gave none (None: send none).
    """
    lines = []
    has_host = False
    for name, values in request.requestHeaders.getAllRawHeaders():
        lower = name.lower()
        if lower in drop or lower in listed:
            continue
        if lower == b"host":
            has_host = True
        for value in values:
            lines.append(name + b": " + value)
    if host is not None and not has_host:
        lines.append(b"Host: " + host)
    return lines


#: The forwarded header lines of a request head already seen, by (its header bytes as
#: received, the upstream's authority).  Why: a client sends the same headers request after
#: request (the path is in the request line, not here), and what is forwarded is a pure
#: function of those bytes, as the one-pass parser turned them into ``requestHeaders``
#: (harp.web.channel.HarpChannel, which keeps them as ``header_block``);
#: docs/performance.md.  Bounded: blocks up to 2 KiB, emptied when full.
_FORWARDED: Final[dict[tuple[bytes, bytes, frozenset[bytes]], bytes]] = {}
_MAX_REMEMBERED_BLOCKS: Final = 1024
_MAX_REMEMBERED_BLOCK: Final = 2048
_NOTHING: Final[frozenset[bytes]] = frozenset()


def _forwarded_headers(request: Request, authority: bytes, also_drop: frozenset[bytes]) -> bytes:
    """The client's unchanged headers to pass on, joined (CRLF between lines), without
    those named in ``also_drop`` (a constant of the caller: part of the memo's key)."""
    block: bytes | None = getattr(request, "header_block", None)
    if block is None or len(block) > _MAX_REMEMBERED_BLOCK:
        return _joined_header_lines(request, authority, also_drop)
    key = (block, authority, also_drop)
    forwarded = _FORWARDED.get(key)
    if forwarded is None:
        forwarded = _joined_header_lines(request, authority, also_drop)
        remember(_FORWARDED, key, forwarded, _MAX_REMEMBERED_BLOCKS)
    return forwarded


def _joined_header_lines(
    request: Request, authority: bytes, also_drop: frozenset[bytes] = _NOTHING,
) -> bytes:
    drop = _NOT_FORWARDED | also_drop if also_drop else _NOT_FORWARDED
    return b"\r\n".join(_header_lines(
        request, drop, connection_listed(request.requestHeaders), authority
    ))


@lru_cache(maxsize=1024)
def _authority(host: str, port: int) -> bytes:
    """``host:port`` as it goes into a Host header or a URI (IPv6 bracketed, IDNA)."""
    return upstream_uri(host, port, b"/", b"")[7:-1]


def _uri(host: str, port: int) -> URI:
    """The URI an endpoint factory needs, without parsing a string per request."""
    authority = _authority(host, port)
    return URI(b"http", authority, authority.rsplit(b":", 1)[0].strip(b"[]"), port, b"/",
               b"", b"", b"")


# Tests stand in for it with interpreted subclasses (it is compiled, harp/compiled.py).
@mypyc_attr(allow_interpreted_subclasses=True)
class ExAppProxy(ReverseProxyResource):
    """Proxy requests to the upstream chosen by the pipeline (see module docstring)."""

    isLeaf = True

    def __init__(
        self, reactor: Any, connect_timeout: float, server_timeout: float,
        endpoints: EndpointFactory | None = None,
    ) -> None:
        super().__init__("", 0, b"", reactor)
        # Sized for the concurrency, like HAProxy's http-reuse: every connection an
        # exchange used is kept for the next request to the same upstream.
        self.pool = ConnectionPool(reactor, max_idle=MAX_IDLE_PER_UPSTREAM)
        #: The per-request ``HP_TIMEOUT_SERVER`` limits (seconds: a coarse timer will do).
        self.deadlines = deadlines_for(reactor)
        self.endpoints = endpoints or UpstreamEndpoints(reactor, connect_timeout)
        self.server_timeout = server_timeout

    def forward(
        self,
        request: Request,
        host: str,
        port: int,
        target: bytes,
        identity: list[tuple[bytes, bytes]],
        body: IBodyProducer | None,
        on_status: Callable[[int], None] | None = None,
        unresolvable_status: int = 0,
        headers_as_received: bool = False,
        also_drop: frozenset[bytes] = _NOTHING,
    ) -> None:
        """Send ``request`` upstream and relay the answer; never raises.

        ``body`` streams the request body; its framing (Content-Length or chunked) is
        written here, never copied from the client.  ``headers_as_received``: nothing
        changed ``requestHeaders`` since the head was parsed, so the forwarded lines may
        come from those remembered for the same header bytes.  ``also_drop``: header
        names (lower case, a constant) kept back on top of the hop-by-hop, HaRP and
        identity headers (the Docker passthrough's secrets).  ``unresolvable_status``: the
        error answered when the upstream's name does not resolve (0: as any unreachable
        upstream, 503) — a status, not a callback, so that no closure is made per request.
        """
        authority = _authority(host, port)
        lines = [
            _request_line(request, target),
            _forwarded_headers(request, authority, also_drop) if headers_as_received
            else _joined_header_lines(request, authority, also_drop),
        ]
        for name, value in identity:
            lines.append(name + b": " + value)
        chunked = False
        pipe: BodyPipe | None = None
        if body is not None:
            pipe = cast(BodyPipe, body)
            length = pipe.length
            if isinstance(length, int):
                lines.append(b"Content-Length: %d" % length)
            else:
                chunked = True
                lines.append(b"Transfer-Encoding: chunked")
        lines.append(b"\r\n")
        head = b"\r\n".join(lines)
        _Forward(
            self, request, (host, port), request.method, head, pipe, chunked, on_status,
            unresolvable_status,
        ).start()

    def upgrade(
        self,
        request: HarpRequest,
        host: str,
        port: int,
        target: bytes,
        identity: list[tuple[bytes, bytes]],
        protocol: bytes,
        idle: float | None,
        on_status: Callable[[int], None] | None = None,
    ) -> None:
        """Ask the ExApp to switch to ``protocol``; relay bytes only if it answers 101."""
        # The connection-level headers are the point of an upgrade: nothing that
        # Connection lists is dropped, and no Host is made up.
        lines = [_request_line(request, target)]
        lines += _header_lines(request, _NOT_FORWARDED_UPGRADE, frozenset(), None)
        lines.extend(name + b": " + value for name, value in identity)
        head = b"\r\n".join(lines) + b"\r\n\r\n"

        def failed(status: int) -> None:
            if responses.gone(request):
                return
            if status == 504:
                self._reply(request, 504, GATEWAY_TIMEOUT)
            elif status == 502:
                self._reply(request, 502, BAD_GATEWAY)
            else:
                self._reply(request, 503, None)

        endpoint = self.endpoints.endpointForURI(_uri(host, port))
        WebSocketUpgrade(
            request, head, protocol, idle, self.server_timeout, self.reactor, failed, on_status
        ).start(endpoint)

    def _reply(self, request: Request, status: int, body: bytes | None) -> None:
        responses.close_early(request)
        responses.finish(
            request,
            responses.error(request, status) if body is None
            else responses.send(request, status, body),
        )

    def _bug(self, failure: Failure, request: Request) -> None:
        responses.internal_error(request, failure, log, "proxying failed")
