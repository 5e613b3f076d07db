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
from typing import Any, Final, cast

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Request

from harp.logs import HarpLogger
from harp.timers import cancel
from harp.web import responses
from harp.web.headers import HOP_BY_HOP, connection_listed
from harp.web.site import HarpRequest
from harp.web.upgrade import WebSocketUpgrade
from harp.web.upstream import UpstreamEndpoints, upstream_uri

log = HarpLogger("harp.proxy")

GATEWAY_TIMEOUT: Final = b"504 Gateway Timeout"
#: Headers only HaRP may read: the daemon's key and AppAPI's routing hints never
#: reach an ExApp (docs/security.md, "What an ExApp receives").
HARP_ONLY: Final = frozenset(
    {b"harp-shared-key", b"ex-app-host", b"ex-app-port", b"docker-engine-port"}
)
#: Request headers not copied upstream: hop-by-hop ones, the body framing (the Agent
#: writes its own from the streamed body), Expect (we answered 100 ourselves) and
#: HaRP's own headers.
_NOT_FORWARDED: Final = HOP_BY_HOP | HARP_ONLY | {b"content-length", b"expect"}
#: For an Upgrade the connection-level headers are the point and are kept.
_NOT_FORWARDED_UPGRADE: Final = (
    (HOP_BY_HOP - {b"connection", b"upgrade"}) | HARP_ONLY | {b"expect"}
)
BAD_GATEWAY: Final = b"502 Bad Gateway"


class _ResponseBody(Protocol):
    """Streams an upstream response body into the client's request."""

    def __init__(self, request: Request, reactor: IReactorTime, idle: float,
                 done: Deferred[None]) -> None:
        self.request = request
        self.reactor = reactor
        self.idle = idle
        self.done = done
        self.client_gone = False
        self.timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.request.registerProducer(cast(IPushProducer, self.transport), True)
        self.timer = self.reactor.callLater(self.idle, self._idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self.client_gone:
            return
        if self.timer is not None:
            self.timer.reset(self.idle)
        self.request.write(data)

    def client_lost(self) -> None:
        self.client_gone = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _idle_timeout(self) -> None:
        self.timer = None
        log.info("upstream idle for {idle}s mid-response: aborting", idle=self.idle)
        self.client_lost()
        responses.abort(self.request)

    def connectionLost(self, reason: Failure = PotentialDataLoss) -> None:  # type: ignore[assignment]
        cancel(self.timer)
        self.timer = None
        if not self.client_gone:
            self.request.unregisterProducer()
            if reason.check(ResponseDone, PotentialDataLoss):
                self.request.finish()
            else:
                # A truncated body must not look complete to the client.
                responses.abort(self.request)
        self.done.callback(None)


class ExAppProxy(ReverseProxyResource):
    """Proxy requests to the upstream chosen by the pipeline (see module docstring)."""

    isLeaf = True

    def __init__(
        self, reactor: Any, connect_timeout: float, server_timeout: float,
        endpoints: UpstreamEndpoints | None = None,
    ) -> None:
        super().__init__("", 0, b"", reactor)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 64
        # Below uvicorn's 5 s keep-alive, so we rarely reuse a connection the ExApp
        # is closing at that very moment.
        self.pool.cachedConnectionTimeout = 4
        self.endpoints = endpoints or UpstreamEndpoints(reactor, connect_timeout)
        self.agent = Agent.usingEndpointFactory(reactor, self.endpoints, pool=self.pool)
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
        on_unresolvable: Callable[[], None] | None = None,
    ) -> None:
        """Send ``request`` upstream and relay the answer; never raises.

        ``body`` streams the request body (the Agent sets its framing headers).
        """
        headers = Headers()
        listed = connection_listed(request.requestHeaders)
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower not in _NOT_FORWARDED and lower not in listed:
                headers.setRawHeaders(name, values)
        for name, value in identity:
            headers.setRawHeaders(name, [value])
        _, _, query = request.uri.partition(b"?")
        uri = upstream_uri(host, port, target, query)
        pending = self.agent.request(request.method, uri, headers, body)
        state: dict[str, Any] = {"body": None, "timed_out": False}

        def timed_out(result: Any, timeout: float) -> Any:
            state["timed_out"] = True
            return result

        pending.addTimeout(self.server_timeout, self.reactor, onTimeoutCancel=timed_out)
        finished = request.notifyFinish()

        def client_lost(reason: Failure) -> None:
            streaming = state["body"]
            if streaming is not None:
                streaming.client_lost()
            elif not pending.called:
                pending.cancel()

        finished.addErrback(client_lost)

        def got_response(response: IResponse) -> Deferred[None] | None:
            if on_status is not None:
                on_status(response.code)
            if responses.gone(request):
                response.deliverBody(_Discard())
                return None
            request.setResponseCode(response.code, response.phrase)
            out = request.responseHeaders
            listed = connection_listed(response.headers)
            for name, values in response.headers.getAllRawHeaders():
                lower = name.lower()
                if lower not in HOP_BY_HOP and lower not in listed:
                    out.setRawHeaders(name, values)
            done: Deferred[None] = Deferred()
            streaming = _ResponseBody(request, self.reactor, self.server_timeout, done)
            state["body"] = streaming
            response.deliverBody(streaming)
            return done

        def failed(failure: Failure) -> None:
            if responses.gone(request):
                return
            if state["timed_out"]:
                self._reply(request, 504, GATEWAY_TIMEOUT)
            elif failure.check(DNSLookupError):
                if on_unresolvable is not None:
                    on_unresolvable()
                else:
                    self._reply(request, 503, None)
            elif failure.check(ConnectError, TimeoutError, CancelledError):
                log.info("upstream {host}:{port} unreachable: {error}", host=host, port=port,
                         error=failure.getErrorMessage())
                self._reply(request, 503, None)
            else:
                log.info("upstream {host}:{port} failed: {error}", host=host, port=port,
                         error=failure.getErrorMessage())
                self._reply(request, 502, BAD_GATEWAY)

        pending.addCallbacks(got_response, failed)
        pending.addErrback(self._bug, request)

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
        _, _, query = request.uri.partition(b"?")
        path = (target or b"/") + (b"?" + query if query else b"")
        replaced = {name for name, _ in identity}
        lines = [b"%s %s HTTP/1.1" % (request.method, path)]
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower in _NOT_FORWARDED_UPGRADE or lower in replaced:
                continue
            lines.extend(name + b": " + value for value in values)
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

        endpoint = self.endpoints.endpointForURI(URI.fromBytes(upstream_uri(host, port, b"/", b"")))
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


class _Discard(Protocol):
    def connectionLost(self, reason: Failure = PotentialDataLoss) -> None:  # type: ignore[assignment]
        pass
