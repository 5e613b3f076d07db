"""``/k8s/exapp/*``, ``/info`` and ``/exapp_storage`` in Kubernetes mode: the HTTP adapter.

Each endpoint reads its body first (``Invalid JSON body`` / ``Payload validation error``
→ 400), then, unless the operation works without a cluster, checks that the backend is
usable (503 ``Kubernetes backend is disabled in HaRP.``, ``… API server is not
configured.``, ``… token is not configured.``), then runs the operation.  Two work without
a cluster, as AppAPI expects: ``install_certificates`` (204, certificates are a cluster
matter) and ``expose`` with ``expose_type: manual``.

The routes are registered whether the backend is on or not, so a ``kubernetes-install``
daemon pointed at a HaRP without Kubernetes gets those clear 503s rather than 404s.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET, Request

from harp.docker.lifecycle import Outcome
from harp.docker.names import (
    CertificatesPayload,
    ExAppName,
    PayloadError,
    RemovePayload,
    parse_json_object,
)
from harp.docker.routes import as_coroutine, reply_failure, reply_outcome
from harp.exapps import ExAppRecord
from harp.k8s.client import K8sClient
from harp.k8s.discovery import Discovery
from harp.k8s.lifecycle import K8sLifecycle
from harp.k8s.payloads import CreateSpec, ExposeSpec
from harp.k8s.probe import ReachabilityProbe
from harp.logs import HarpLogger
from harp.web import responses
from harp.web.control import ControlPlane, Handler, info_payload
from harp.web.storage import read_record

log = HarpLogger("harp.k8s")

P = TypeVar("P")
PREFIX: Final = b"/k8s/exapp/"


class Storage(Protocol):
    """The ``/exapp_storage`` endpoints this wraps (single process or worker)."""

    def put(self, request: Request, app_id: str, record: ExAppRecord) -> bytes | int: ...

    def post(self, request: Request, rest: bytes) -> bytes | int: ...

    def delete(self, request: Request, rest: bytes) -> bytes | int: ...


def _always(payload: object) -> bool:
    return True


def _needs_cluster(spec: ExposeSpec) -> bool:
    return spec.expose_type != "manual"


async def _no_op(payload: CertificatesPayload) -> Outcome:
    return Outcome(204)


class K8sRoutes:
    def __init__(self, client: K8sClient, lifecycle: K8sLifecycle,
                 probe: ReachabilityProbe) -> None:
        self.client = client
        self.lifecycle = lifecycle
        self.probe = probe

    def register(self, control: ControlPlane) -> None:
        ops = self.lifecycle
        routes: list[tuple[bytes, Handler]] = [
            (b"exists", self._endpoint(ExAppName.parse, ops.exists)),
            (b"create", self._endpoint(CreateSpec.parse, ops.create)),
            (b"start", self._endpoint(ExAppName.parse, ops.start)),
            (b"stop", self._endpoint(ExAppName.parse, ops.stop)),
            (b"wait_for_start",
             self._endpoint(ExAppName.parse, ops.wait_for_start, cancel=True)),
            (b"remove", self._endpoint(RemovePayload.parse, ops.remove)),
            (b"install_certificates",
             self._endpoint(CertificatesPayload.parse, _no_op, gate=lambda _: False)),
            (b"expose", self._endpoint(ExposeSpec.parse, ops.expose, gate=_needs_cluster)),
        ]
        for name, handler in routes:
            control.add(b"POST", PREFIX + name, handler)
        if self.client.settings.enabled:
            control.add(b"GET", b"/info", self.info)
            control.add(b"HEAD", b"/info", self.info)

    def _endpoint(
        self, parse: Callable[[dict[str, Any]], P],
        operation: Callable[[P], Awaitable[Outcome]],
        gate: Callable[[P], bool] = _always, cancel: bool = False,
    ) -> Handler:
        def handle(request: Request, rest: bytes) -> bytes | int:
            content = request.content
            try:
                payload = parse(parse_json_object(content.read() if content else b""))
            except PayloadError as exc:
                return responses.send(request, 400, str(exc).encode())
            why = self.client.unusable() if gate(payload) else None
            if why is not None:
                return responses.send(request, 503, why.encode())
            answer = Deferred.fromCoroutine(as_coroutine(operation(payload)))
            answer.addCallback(partial(reply_outcome, request)).addErrback(
                lambda failure: reply_failure(request, failure, rest)
            )
            if cancel:  # nobody waits any more: stop polling the pods
                request.notifyFinish().addErrback(lambda _: answer.cancel())
            return NOT_DONE_YET

        return handle

    def info(self, request: Request, rest: bytes) -> bytes | int:
        """``/info`` with ``kubernetes: {enabled, api_server, reachable}``."""
        known = self.probe.cached()
        if known is not None:
            return self._info(request, known)
        self.probe.reachable().addCallback(
            lambda reachable: None if responses.gone(request)
            else responses.finish(request, self._info(request, reachable))
        )
        return NOT_DONE_YET

    def _info(self, request: Request, reachable: bool) -> bytes:
        kubernetes = {"enabled": True, "api_server": self.client.settings.api_server,
                      "reachable": reachable}
        return responses.send_json(request, 200, info_payload(kubernetes))


class K8sStorage:
    """``/exapp_storage`` pushes get the app's Kubernetes upstream before they are stored.

    AppAPI pushes the app id as the host of a Kubernetes app; storing that would route
    requests to a name that does not resolve (reference #101).  A cluster that cannot be
    asked → 503 and nothing stored; an app Kubernetes does not know is stored as pushed.
    """

    def __init__(self, inner: Storage, discovery: Discovery) -> None:
        self.inner = inner
        self.discovery = discovery

    def post(self, request: Request, rest: bytes) -> bytes | int:
        parsed = read_record(request, rest)
        if isinstance(parsed, bytes):
            return parsed
        app_id, record = parsed
        if self.discovery.client.unusable() is not None:
            return self.inner.put(request, app_id, record)
        resolving = Deferred.fromCoroutine(self.discovery.apply(app_id, record))
        resolving.addCallbacks(
            lambda resolved: self._store(request, app_id, resolved),
            lambda failure: reply_failure(request, failure, rest),
        )
        return NOT_DONE_YET

    def _store(self, request: Request, app_id: str, record: ExAppRecord) -> None:
        if responses.gone(request):
            return
        body = self.inner.put(request, app_id, record)
        if body != NOT_DONE_YET:
            assert isinstance(body, bytes)
            responses.finish(request, body)

    def put(self, request: Request, app_id: str, record: ExAppRecord) -> bytes | int:
        return self.inner.put(request, app_id, record)

    def delete(self, request: Request, rest: bytes) -> bytes | int:
        return self.inner.delete(request, rest)
