"""``/docker/exapp/*`` on the control plane: the HTTP adapter of the ExApp lifecycle.

Each route turns a request into one :class:`~harp.docker.lifecycle.DockerLifecycle`
operation and its :class:`~harp.docker.lifecycle.Outcome` back into a response, so the
operations never see a request and this module never talks to an engine.  The checks run
in the reference's order, which decides the answer when several things are wrong: a
missing ``docker-engine-port`` is a plain 400, an invalid one a JSON 400, then the body
(400 ``Payload validation error``), and only then whether an engine is connected there
(JSON 503).  An :class:`~harp.docker.client.EngineError` becomes its status (503/504)
with a plain-text message; ``wait_for_start`` stops polling when the client goes away.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.server import NOT_DONE_YET, Request

from harp.docker.client import Deadline, EngineClient, EngineError, engine_pool
from harp.docker.engines import (
    PORT_HEADER,
    EngineEndpoints,
    EngineSelectionError,
    refuse_selection,
    requested_port,
)
from harp.docker.lifecycle import (
    TIMEOUT_CERTS,
    TIMEOUT_CREATE,
    TIMEOUT_EXISTS,
    TIMEOUT_SHORT,
    TIMEOUT_WAIT,
    DockerLifecycle,
    Outcome,
)
from harp.docker.names import (
    CertificatesPayload,
    CreatePayload,
    ExAppName,
    PayloadError,
    RemovePayload,
    parse_image_ref,
    parse_json_object,
)
from harp.logs import HarpLogger
from harp.web import responses
from harp.web.control import ControlPlane, Handler
from harp.web.headers import last_header

log = HarpLogger("harp.docker")

P = TypeVar("P")

MISSING_PORT: Final = b"Missing 'docker-engine-port' header."

Operation = Callable[[EngineClient, P, Deadline], Awaitable[Outcome]]


class LifecycleRoutes:
    """Registers the lifecycle operations as ``POST /docker/exapp/<name>`` handlers."""

    def __init__(
        self, reactor: Any, endpoints: EngineEndpoints, lifecycle: DockerLifecycle
    ) -> None:
        self.reactor = reactor
        self.endpoints = endpoints
        self.lifecycle = lifecycle
        self.pool = engine_pool(reactor)
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)

    def register(self, control: ControlPlane) -> None:
        ops = self.lifecycle
        routes: list[tuple[bytes, Handler]] = [
            (b"exists", self._endpoint(ExAppName.parse, ops.exists, TIMEOUT_EXISTS)),
            (b"create", self._endpoint(CreatePayload.parse, ops.create, TIMEOUT_CREATE)),
            (b"start", self._endpoint(ExAppName.parse, ops.start, TIMEOUT_SHORT)),
            (b"stop", self._endpoint(ExAppName.parse, ops.stop, TIMEOUT_SHORT)),
            (b"wait_for_start",
             self._endpoint(ExAppName.parse, ops.wait_for_start, TIMEOUT_WAIT, cancel=True)),
            (b"remove", self._endpoint(RemovePayload.parse, ops.remove, TIMEOUT_SHORT)),
            (b"image_remove",
             self._endpoint(parse_image_ref, ops.image_remove, TIMEOUT_SHORT)),
            (b"install_certificates",
             self._endpoint(CertificatesPayload.parse, ops.install_certificates,
                            TIMEOUT_CERTS)),
        ]
        for name, handler in routes:
            control.add(b"POST", b"/docker/exapp/" + name, handler)

    def _endpoint(
        self,
        parse: Callable[[dict[str, Any]], P],
        operation: Operation[P],
        seconds: float,
        cancel: bool = False,
    ) -> Handler:
        """Header → engine, body → payload, then run ``operation`` within ``seconds``."""

        def handle(request: Request, rest: bytes) -> bytes | int:
            raw_port = last_header(request, PORT_HEADER)
            if not raw_port or not raw_port.strip():
                return responses.send(request, 400, MISSING_PORT)
            try:
                port = requested_port(request)
                payload = parse(parse_json_object(_body(request)))
                self.endpoints.require(port)
            except EngineSelectionError as exc:
                return refuse_selection(request, exc)
            except PayloadError as exc:
                return responses.send(request, 400, str(exc).encode())
            client = EngineClient(self.reactor, self.agent, port)
            running = Deferred.fromCoroutine(
                as_coroutine(operation(client, payload, Deadline(self.reactor, seconds)))
            )
            running.addCallbacks(
                lambda outcome: reply_outcome(request, outcome),
                lambda failure: reply_failure(request, failure, rest),
            )
            if cancel:
                # Nobody waits for the answer any more: stop polling the engine.
                request.notifyFinish().addErrback(lambda _: running.cancel())
            return NOT_DONE_YET

        return handle


def _body(request: Request) -> bytes:
    return request.content.read() if request.content is not None else b""


async def as_coroutine(awaitable: Awaitable[Outcome]) -> Outcome:
    """Any awaitable as a coroutine, for ``Deferred.fromCoroutine`` (also the K8s routes)."""
    return await awaitable


def reply_outcome(request: Request, outcome: Outcome) -> None:
    """Write a lifecycle endpoint's outcome (JSON or text) unless the client has gone."""
    if responses.gone(request):
        return
    if outcome.payload is not None:
        body = responses.send_json(request, outcome.status, outcome.payload)
    else:
        body = responses.send(request, outcome.status, (outcome.text or "").encode())
    responses.finish(request, body)


def reply_failure(request: Request, failure: Failure, rest: bytes) -> None:
    """A failed lifecycle call as its documented status: an engine (or Kubernetes API)
    error as its own status and message, a bad payload as 400, anything else as 500."""
    if failure.check(EngineError):
        error = failure.value
        assert isinstance(error, EngineError)
        log.warn("{path}: {error}", path=rest.decode("latin-1"), error=error.message)
        reply_outcome(request, Outcome(error.status, text=error.message))
        return
    if failure.check(PayloadError):
        reply_outcome(request, Outcome(400, text=str(failure.value)))
        return
    if failure.check(CancelledError):
        return  # the client went away (wait_for_start only)
    log.failure("{path} failed", failure, path=rest.decode("latin-1"))
    reply_outcome(request, Outcome(500, text="An unexpected error occurred."))
