"""The one root resource of the ExApp frontends, and the Site that serves it.

The root is a leaf: it sees the raw path once and hands the request to the decision
pipeline, instead of letting ``twisted.web`` walk a resource tree segment by segment
(which would split and decode the path that the pipeline must inspect raw,
reference-behaviour §3.1).  It then carries out the verdict: drop, a generated error,
the control plane, or the proxy.
"""

from __future__ import annotations

import time
from typing import Final

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from harp.logs import HarpLogger
from harp.web import responses
from harp.web.control import ControlPlane
from harp.web.pipeline import Control, Drop, Forward, Pipeline, Reply, Verdict
from harp.web.proxy import ExAppProxy

log = HarpLogger("harp.access")
errors = HarpLogger("harp.web")

#: Set on every proxied request; AppAPI's real value is overwritten (reference §3.2).
AA_VERSION: Final = b"32"


class Root(Resource):
    """Decide with the pipeline, then act: drop, error, control plane or proxy."""

    isLeaf = True

    def __init__(self, pipeline: Pipeline, control: ControlPlane, proxy: ExAppProxy) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.control = control
        self.proxy = proxy

    def render(self, request: Request) -> int:  # type: ignore[override]
        client = self.pipeline.client_address(request)
        decided = Deferred.fromCoroutine(self.pipeline.decide(request, client))
        decided.addCallback(self._act, request)
        decided.addErrback(self._internal_error, request)
        return NOT_DONE_YET

    def _act(self, verdict: Verdict, request: Request) -> None:
        if getattr(request, "_disconnected", False):
            return
        if isinstance(verdict, Forward):
            self._forward(verdict, request)
        elif isinstance(verdict, Reply):
            self._finish(request, responses.error(request, verdict.status))
        elif isinstance(verdict, Control):
            body = self.control.render(request, verdict.rest)
            if body != NOT_DONE_YET:
                assert isinstance(body, bytes)
                self._finish(request, body)
        elif isinstance(verdict, Drop):
            if isinstance(request, HarpRequest):
                request.note = verdict.reason
                request.channel.factory.log(request)  # type: ignore[union-attr]
            responses.drop(request)

    def _forward(self, verdict: Forward, request: Request) -> None:
        record = verdict.record
        if isinstance(request, HarpRequest):
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

        def unresolvable() -> None:
            # A signed call (e.g. /init) must never see a 404 of ours: Nextcloud would
            # take it for "init done" (audit notes).
            self._finish(request, responses.error(request, 503 if verdict.signed else 404))

        self.proxy.forward(
            request, record.host, record.port, verdict.target, identity, on_status, unresolvable
        )

    @staticmethod
    def _finish(request: Request, body: bytes) -> None:
        if body:
            request.write(body)
        request.finish()

    def _internal_error(self, failure: Failure, request: Request) -> None:
        errors.failure("request pipeline failed", failure)
        if not request.finished and not getattr(request, "_disconnected", False):
            if request.startedWriting:
                responses.abort(request)
            else:
                self._finish(request, responses.error(request, 503))


class HarpRequest(Request):
    """Remembers when it started and which app it was for, for the access line."""

    started: float = 0.0
    app_id: str = "-"
    note: str = ""
    # A proxied response without Content-Type must stay without one.
    defaultContentType = None

    def process(self) -> None:
        self.started = time.monotonic()
        super().process()

    def render(self, resrc: Resource) -> None:
        # twisted.web announces itself; a reverse proxy should not.
        self.responseHeaders.removeHeader(b"server")
        super().render(resrc)


class HarpSite(Site):
    """A Site whose access log is one line at info level, without secrets or query."""

    requestFactory = HarpRequest
    displayTracebacks = False
    noisy = False

    def log(self, request: http.Request) -> None:
        if not isinstance(request, HarpRequest):
            return
        client = request.getClientAddress()
        log.info(
            "{client} {method} {path} {status} app={app} {ms:.1f}ms{note}",
            client=getattr(client, "host", "-"),
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            status="drop" if request.note else request.code,
            app=request.app_id,
            ms=(time.monotonic() - request.started) * 1000,
            note=f" ({request.note})" if request.note else "",
        )
