"""The one root resource of the ExApp frontends, and the Site that serves it.

The root is a leaf: it sees the raw path once and hands the request to the decision
pipeline, instead of letting ``twisted.web`` walk a resource tree segment by segment
(which would split and decode the path that the pipeline must inspect raw,
docs/compatibility.md#request-pipeline).  It then carries out the verdict: drop, a generated error,
the control plane, or the proxy.
"""

from __future__ import annotations

from io import BytesIO
from typing import Final, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from harp.logs import HarpLogger
from harp.web import responses
from harp.web.control import ControlPlane
from harp.web.headers import header_values
from harp.web.pipeline import ControlPlaneCall, Drop, Forward, Pipeline, Reply, Verdict
from harp.web.proxy import ExAppProxy
from harp.web.site import HarpRequest

errors = HarpLogger("harp.web")


class DockerPassthrough(Protocol):
    """The Docker Engine API passthrough (``harp.docker``); it answers the request."""

    def passthrough(self, request: HarpRequest, rest: bytes) -> None: ...


#: Largest body the control plane reads (ExApp records are a few KiB).
CONTROL_BODY_LIMIT: Final = 1 << 20

#: Set on every proxied request; AppAPI's real value is overwritten
#: (docs/compatibility.md#forwarding-to-an-exapp).
AA_VERSION: Final = b"32"


class Root(Resource):
    """Decide with the pipeline, then act: drop, error, control plane or proxy."""

    isLeaf = True
    #: ``render`` serves every method and always answers later (``NOT_DONE_YET``): the
    #: request may call it directly, without twisted.web's dispatch around it
    #: (:meth:`harp.web.site.HarpRequest.begin`).
    answers_later = True

    def __init__(
        self, pipeline: Pipeline, control: ControlPlane, proxy: ExAppProxy,
        tunnel_timeout: float | None, docker: DockerPassthrough | None = None,
    ) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.control = control
        self.proxy = proxy
        #: ``HP_TIMEOUT_TUNNEL`` (HAProxy's ``timeout tunnel``): an upgraded connection's
        #: idle limit.
        self.tunnel_timeout = tunnel_timeout
        self.docker = docker

    def render(self, request: Request) -> int:  # type: ignore[override]
        client = self.pipeline.client_address(request, cast(HarpRequest, request).started)
        deciding = self.pipeline.decide(request, client)
        # Most requests are decided without waiting (banned, public route, cached session,
        # known ExApp): run the coroutine's first step here and act at once, sparing the
        # Deferred and context machinery of fromCoroutine (docs/performance.md).  Only a
        # decision that waits on Nextcloud is handed to Twisted, which resumes it where it
        # stopped: awaiting a Deferred re-yields it until it has a result.
        try:
            deciding.send(None)
        except StopIteration as decided_now:
            try:
                self._act(decided_now.value, request)
            except Exception:
                self._internal_error(Failure(), request)
            return NOT_DONE_YET
        except Exception:
            self._internal_error(Failure(), request)
            return NOT_DONE_YET
        decided = Deferred.fromCoroutine(deciding)
        decided.addCallback(self._act, request)
        decided.addErrback(self._internal_error, request)
        return NOT_DONE_YET

    def _act(self, verdict: Verdict, req: Request) -> None:
        request = cast(HarpRequest, req)
        if responses.gone(request):
            return
        if isinstance(verdict, Forward):
            self._forward(verdict, request)
        elif isinstance(verdict, Reply):
            # Do not make the client upload a body nobody will read.
            request.close_early()
            responses.finish(
                request,
                responses.error(request, verdict.status) if verdict.body is None
                else responses.send(request, verdict.status, verdict.body),
            )
        elif isinstance(verdict, ControlPlaneCall):
            self._control(verdict, request)
        elif isinstance(verdict, Drop):
            request.note = verdict.reason
            if request.site is not None:
                request.site.log(request)
            responses.drop(request)

    def _control(self, verdict: ControlPlaneCall, request: HarpRequest) -> None:
        if not request.has_body or request.body is None:
            request.content = BytesIO(b"")
            self._control_render(verdict, request)
            return

        def got(data: bytes) -> None:
            request.content = BytesIO(data)
            self._control_render(verdict, request)

        def too_large(failure: Failure) -> None:
            request.close_early()
            responses.finish(request, responses.send(request, 413, b"413 Payload Too Large"))

        request.body.collect(CONTROL_BODY_LIMIT).addCallbacks(got, too_large).addErrback(
            self._internal_error, request
        )

    def _control_render(self, verdict: ControlPlaneCall, request: HarpRequest) -> None:
        if responses.gone(request):
            return
        # A docker-engine-port header selects the raw Engine API passthrough, except for
        # HaRP's own /docker/... endpoints (docs/compatibility.md#control-plane).
        if (
            self.docker is not None
            and header_values(request.requestHeaders, b"docker-engine-port") is not None
            and not verdict.rest.startswith(b"/docker/")
        ):
            self.docker.passthrough(request, verdict.rest)
            return
        body = self.control.render(request, verdict.rest)
        if body != NOT_DONE_YET:
            assert isinstance(body, bytes)
            responses.finish(request, body)

    def _forward(self, verdict: Forward, request: HarpRequest) -> None:
        record = verdict.record
        request.app_id = verdict.app_id.decode("latin-1")
        identity = [
            (b"ex-app-id", verdict.app_id),
            (b"ex-app-version", record.version.encode("utf-8")),
            (b"authorization-app-api", verdict.authorization),
            (b"aa-version", AA_VERSION),
        ]
        watched = verdict.bruteforce
        on_status = None
        if watched:
            def on_status(status: int) -> None:
                if status in watched:
                    self.pipeline.fail(verdict.client, f"ExApp answered {status}")

        protocol = upgrade_protocol(request)
        if protocol is not None:
            if request.has_body:
                # An upgrade never carries a body; one that does is a smuggling attempt.
                request.close_early()
                responses.finish(request, responses.error(request, 400))
                return
            self.proxy.upgrade(
                request, record.host, record.port, verdict.target, identity, protocol,
                self.tunnel_timeout, on_status,
            )
            return
        body = request.body if request.has_body else None
        # An upstream name that does not resolve: 404, but a signed call (e.g. /init) must
        # never see a 404 of ours: Nextcloud would take it for "init done"
        # (docs/differences.md#18).
        self.proxy.forward(
            request, record.host, record.port, verdict.target, identity, body, on_status,
            503 if verdict.signed else 404, headers_as_received=True,
        )

    def _internal_error(self, failure: Failure, request: Request) -> None:
        responses.internal_error(request, failure, errors, "request pipeline failed")


#: Protocols a client may upgrade to.  Anything else (``h2c``, made-up tokens) is
#: proxied as a plain request with its ``Upgrade`` header dropped as hop-by-hop.
UPGRADABLE: Final = frozenset({b"websocket"})


def upgrade_protocol(request: Request) -> bytes | None:
    """The protocol a ``GET`` asks to switch to, if we relay it (RFC 9110 §7.8).

    ``Upgrade`` must name an allowed protocol and ``Connection`` must list ``upgrade``.
    """
    headers = request.requestHeaders
    upgrade = header_values(headers, b"upgrade")
    if not upgrade or request.method != b"GET" or request.clientproto == b"HTTP/2":
        # HTTP/2 has no Upgrade (the h2 package refuses the header; checked again here):
        # a WebSocket client uses an HTTP/1.1 connection (docs/security.md#http2).
        return None
    if not any(
        token.strip().lower() == b"upgrade"
        for value in headers.getRawHeaders(b"connection", [])
        for token in value.split(b",")
    ):
        return None
    asked = {token.strip().lower() for value in upgrade for token in value.split(b",")}
    allowed = asked & UPGRADABLE
    return next(iter(allowed)) if allowed else None
