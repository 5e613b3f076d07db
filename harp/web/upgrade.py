"""Upgraded connections (WebSockets): a byte relay, but only after ``101``.

The request head is re-sent to the ExApp on a dedicated upstream connection (not the
keep-alive pool: it will never come back) with the identity headers set.  The client
connection stays HTTP until the ExApp's answer is known:

- ``101 Switching Protocols`` whose ``Upgrade`` names the protocol asked for: the head
  is passed on and the HTTP channel hands the connection over to a
  :class:`~harp.relay.Relay`; from then on bytes flow both ways untouched.
- anything else: passed on as an ordinary response (its body framed by its own
  Content-Length / chunked / close), the upstream connection is closed, and the
  client connection goes on speaking HTTP, so every further request it sends meets
  the whole pipeline again.  Relaying before the answer let a client smuggle raw
  requests past every check when an ExApp refused the upgrade (docs/security.md).

States: ``connecting`` → ``head`` → ``switched`` | ``refused`` → ``closed``.  Until
``switched`` the ExApp has ``HP_TIMEOUT_SERVER`` per step; once switched, the relay's
idle limit is ``HP_TIMEOUT_TUNNEL`` (default: the server timeout; 0 = never), so an
idle WebSocket is not cut at the client timeout.

The access line of a switched connection is written when the tunnel closes, not when
the ``101`` is relayed: only then are its length and the bytes it carried known, and
one line per request must say how it ended (docs/operations.md, "Logs").  The switch
itself is logged at debug.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from harp.logs import HarpLogger
from harp.relay import Relay
from harp.timers import cancel
from harp.web import responses
from harp.web.channel import HarpChannel
from harp.web.response_body import ResponseBody
from harp.web.response_head import BadResponse, ResponseHead, body_framing, parse_response_head
from harp.web.site import HarpRequest

log = HarpLogger("harp.upgrade")


class _Upstream(Protocol):
    def __init__(self, upgrade: WebSocketUpgrade) -> None:
        self.upgrade = upgrade

    def connectionMade(self) -> None:
        self.upgrade.upstream_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.upgrade.upstream_data(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.upgrade.upstream_lost()


class WebSocketUpgrade:
    """One upgrade request: ask the ExApp, then relay (``101``) or answer (otherwise)."""

    def __init__(
        self,
        request: HarpRequest,
        head: bytes,
        protocol: bytes,
        idle: float | None,
        server_timeout: float,
        clock: IReactorTime,
        on_failure: Callable[[int], None],
        on_status: Callable[[int], None] | None = None,
    ) -> None:
        channel: object = request.channel  # twisted.web types it as its own channel
        assert isinstance(channel, HarpChannel)
        self.request = request
        self.channel = channel
        self.head = head
        self.protocol = protocol
        self.idle = idle
        self.server_timeout = server_timeout
        self.clock = clock
        self.on_failure = on_failure
        self.on_status = on_status
        self.upstream: _Upstream | None = None
        self.state = "connecting"
        self.buffer = b""
        self.timer: IDelayedCall | None = None
        self.relay: Relay | None = None
        #: A refused upgrade's answer body, passed on to the client.
        self.body: ResponseBody | None = None

    def start(self, endpoint: IStreamClientEndpoint) -> None:
        factory = Factory.forProtocol(lambda: _Upstream(self))
        factory.noisy = False  # a "Starting factory" line per WebSocket otherwise
        connecting = endpoint.connect(factory)
        connecting.addErrback(self._connect_failed)
        self.request.notifyFinish().addErrback(lambda _: self._client_gone())

    def _connect_failed(self, failure: Failure) -> None:
        if self.state == "connecting":
            self.state = "closed"
            self.request.detail = f"upstream unreachable: {failure.getErrorMessage()}"
            self.on_failure(503)

    @property
    def client(self) -> Any:
        """The client's transport (TCP or TLS: both are consumers and producers)."""
        return self.channel.transport

    # --- upstream side

    def upstream_connected(self, upstream: _Upstream) -> None:
        assert upstream.transport is not None
        if self.state != "connecting":
            upstream.transport.loseConnection()
            return
        self.upstream = upstream
        self.state = "head"
        upstream.transport.write(self.head)
        self._arm(self.server_timeout)

    def upstream_data(self, data: bytes) -> None:
        if self.state == "switched":
            assert self.relay is not None
            self.relay.from_upstream(data)
        elif self.state == "head":
            self._head_data(data)
        elif self.state == "refused":
            self._answer_data(data)

    def upstream_lost(self) -> None:
        state, self.upstream = self.state, None
        if state == "switched":
            self.state = "closed"
            assert self.relay is not None
            self.relay.upstream_lost()
        elif state == "head":
            self.state = "closed"
            self._cancel_timer()
            self.request.detail = "upstream closed before answering"
            self.on_failure(502)
        elif state == "refused":
            if self.body is not None and self.body.framing == "close":
                self._answer_done()
            else:
                # A truncated body must not look complete to the client.
                self.state = "closed"
                self._cancel_timer()
                responses.abort(self.request)

    # --- the upstream's answer

    def _head_data(self, data: bytes) -> None:
        self.buffer += data
        while True:
            try:
                parsed = parse_response_head(self.buffer)
            except BadResponse as exc:
                return self._bad_gateway(str(exc))
            if parsed is None:
                return None
            head, rest = parsed
            if head.status == 101 or not 100 <= head.status < 200:
                break
            self.buffer = rest  # an interim 1xx: wait for the final answer
        self.buffer = b""
        if self.on_status is not None:
            self.on_status(head.status)
        if head.status == 101:
            if self.protocol not in head.tokens(b"upgrade"):
                return self._bad_gateway("101 for another protocol")
            return self._switch(head, rest)
        return self._start_answer(head, rest)

    def _switch(self, head: ResponseHead, rest: bytes) -> None:
        assert self.upstream is not None and self.upstream.transport is not None
        self.state = "switched"
        self._cancel_timer()
        client = self.client
        request = self.request
        request.code = head.status
        switched = time.monotonic() - request.started
        log.debug("upgrade: {path} switched to {protocol}", path=request.path,
                  protocol=self.protocol)
        self.relay = relay = Relay(
            client, self.clock, self.idle, self._idle, lambda: self._tunnel_closed(switched)
        )
        # From here on the client connection is the relay's, not HTTP's.
        self.channel.hand_over(relay)
        client.write(head.raw)
        client.unregisterProducer()  # the HTTP channel's own registration ends with HTTP
        relay.connect(self.upstream.transport)  # type: ignore[arg-type]
        if rest:
            relay.from_upstream(rest)

    def _tunnel_closed(self, switched: float) -> None:
        """The relay ended: write the request's access line, with what it carried."""
        relay, request = self.relay, self.request
        assert relay is not None
        request.tunnel = (switched, relay.bytes_up, relay.bytes_down)
        site = getattr(request, "site", None)
        if site is not None:
            site.log(request)

    def _idle(self) -> None:
        self.request.detail = f"idle for {self.idle:g}s"
        self.state = "closed"
        assert self.relay is not None
        self.relay.close()

    def _start_answer(self, head: ResponseHead, rest: bytes) -> None:
        try:
            framing, remaining = body_framing(head, self.request.method)
        except BadResponse as exc:
            return self._bad_gateway(str(exc))
        self.state = "refused"
        request = self.request
        responses.relay_head(request, head)
        body = self.body = ResponseBody(self._answer_write, lambda extra: self._answer_done())
        body.start(framing, remaining)
        if body.empty:
            return self._answer_done()
        assert self.upstream is not None and self.upstream.transport is not None
        request.registerProducer(cast(IPushProducer, self.upstream.transport), True)
        self._arm(self.server_timeout)
        if rest:
            self._answer_data(rest)
        return None

    def _answer_data(self, data: bytes) -> None:
        self._arm(self.server_timeout)
        assert self.body is not None
        try:
            self.body.feed(data)
        except BadResponse:
            self.state = "closed"
            self._close_upstream()
            responses.abort(self.request)

    def _answer_write(self, data: bytes) -> None:
        if self.state == "refused" and data:
            self.request.write(data)

    def _answer_done(self) -> None:
        if self.state != "refused":
            return
        self.state = "closed"
        self._cancel_timer()
        self._close_upstream()
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        if not responses.gone(request):
            request.finish()  # the client connection goes on with HTTP

    def _bad_gateway(self, why: str) -> None:
        self.request.detail = f"bad answer from upstream: {why}"
        self.state = "closed"
        self._cancel_timer()
        self._close_upstream()
        self.on_failure(502)

    # --- client side (until switched; then the relay hears of it from the channel)

    def _client_gone(self) -> None:
        if self.state in ("connecting", "head", "refused"):
            self.state = "closed"
            self._cancel_timer()
            self._close_upstream()

    # --- the ExApp's deadline before the switch

    def _arm(self, seconds: float) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.reset(seconds)
        else:
            self.timer = self.clock.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        cancel(self.timer)
        self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        state = self.state
        if state == "head":
            self.state = "closed"
            self._close_upstream()
            self.on_failure(504)
        elif state == "refused":
            self.state = "closed"
            self._close_upstream()
            responses.abort(self.request)

    def _close_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None and upstream.transport is not None:
            upstream.transport.loseConnection()
