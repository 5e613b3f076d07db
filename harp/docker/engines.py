"""Which Docker engine a request means, and how HaRP talks to it.

AppAPI names the engine with the ``docker-engine-port`` header (the daemon's
``docker_socket_port``).  The reference connects to ``127.0.0.1:<that port>`` whatever it is
(reference issue #77).  We map it instead (spec README, difference 3):

* ``24000`` → the local engine socket ``HP_DOCKER_SOCKET`` when it exists (no frpc hop);
  failing that, an FRP engine tunnel registered on 24000 (the reference's bundled frpc);
* ``24001``-``24099`` → the in-process FRP tunnel registered on that port;
* anything else → 400, and a port with no live engine → 503 naming the port.

So no header value can make HaRP connect to an arbitrary loopback service.

:class:`EngineEndpoints` is the ``IAgentEndpointFactory`` for URIs ``http://engine:<port>/…``:
the passthrough's streaming proxy and :class:`EngineClient` (HaRP's own lifecycle calls) both
use it, so both see the same engine.  :class:`EngineClient` is a small non-blocking HTTP
client over a Twisted ``Agent``: every call has a deadline, bodies are read with a size cap,
and transport failures become :class:`EngineUnavailable` (503) or :class:`EngineTimeout`
(504), the statuses of reference §3.4.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Final, Protocol

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from harp.logs import HarpLogger

log = HarpLogger("harp.docker")

LOCAL_PORT: Final = 24000
REMOTE_PORTS: Final = range(24001, 24100)
#: The URI host of every engine request; the port selects the engine.
ENGINE_HOST: Final = "engine"
#: Largest engine reply HaRP reads itself (inspect JSON, exec output); streams are not read.
BODY_LIMIT: Final = 16 << 20


class TunnelLookup(Protocol):
    """The FRP tunnel registry as seen from here."""

    def endpoint_for(self, port: int) -> IStreamClientEndpoint | None: ...


class EngineSelectionError(Exception):
    """``docker-engine-port`` does not name a usable engine; ``status`` is 400 or 503."""

    def __init__(self, status: int, message: str, port: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.port = port

    def payload(self) -> dict[str, Any]:
        return {"error": self.message, "docker_engine_port": self.port}


class EngineError(Exception):
    """A failed engine exchange; ``status`` is what HaRP answers (503/504)."""

    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EngineUnavailable(EngineError):
    status = 503


class EngineTimeout(EngineError):
    status = 504


def parse_port(raw: bytes | None) -> int:
    """The engine port of a ``docker-engine-port`` value, or :class:`EngineSelectionError`."""
    text = (raw or b"").decode("latin-1").strip()
    if not text.isdigit() or len(text) > 5:
        raise EngineSelectionError(
            400, f"invalid 'docker-engine-port' header value: {text[:32]!r}", text[:32]
        )
    port = int(text)
    if port != LOCAL_PORT and port not in REMOTE_PORTS:
        raise EngineSelectionError(
            400,
            f"'docker-engine-port' {port} is not an engine port: use 24000 (local engine) "
            "or 24001-24099 (FRP engines)",
            text,
        )
    return port


@implementer(IStreamClientEndpoint)
class _NoEngine:
    """An endpoint that fails at once: the engine went away between check and connect."""

    def __init__(self, port: int) -> None:
        self.port = port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return fail(ConnectError(string=f"no Docker engine on port {self.port}"))


@implementer(IAgentEndpointFactory)
class EngineEndpoints:
    """Engine port → stream endpoint (local socket or FRP tunnel)."""

    def __init__(
        self, reactor: Any, socket_path: Path, tunnels: TunnelLookup | None,
        connect_timeout: float,
    ) -> None:
        self.reactor = reactor
        self.socket_path = socket_path
        self.tunnels = tunnels
        self.connect_timeout = connect_timeout

    def local_socket(self) -> bool:
        try:
            return stat.S_ISSOCK(self.socket_path.stat().st_mode)
        except OSError:
            return False

    def endpoint(self, port: int) -> IStreamClientEndpoint | None:
        """The live engine on ``port`` (a valid engine port), or None."""
        if port == LOCAL_PORT and self.local_socket():
            return UNIXClientEndpoint(
                self.reactor, str(self.socket_path), timeout=int(max(1, self.connect_timeout))
            )
        if self.tunnels is not None:
            return self.tunnels.endpoint_for(port)
        return None

    def require(self, port: int) -> None:
        """Raise the 503 naming ``port`` when no engine is connected there."""
        if self.endpoint(port) is not None:
            return
        if port == LOCAL_PORT:
            message = (
                f"no Docker engine on port {port}: the local engine socket "
                f"{self.socket_path} does not exist and no FRP client serves port {port}"
            )
        else:
            message = f"no Docker engine connected on port {port} (no FRP client serves it)"
        raise EngineSelectionError(503, message, str(port))

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint = self.endpoint(uri.port)
        return endpoint if endpoint is not None else _NoEngine(uri.port)


def engine_uri(port: int, path: str, query: bytes = b"") -> bytes:
    """``http://engine:<port><path>[?query]``; ``path`` is already URL-safe."""
    uri = f"http://{ENGINE_HOST}:{port}{path}".encode("ascii")
    return uri + b"?" + query if query else uri


@dataclass(frozen=True, slots=True)
class EngineReply:
    status: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        """The JSON body, or None when it is not JSON (engines answer JSON as a rule)."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None

    def text(self, limit: int = 300) -> str:
        """A short excerpt for logs (engine error messages; never request secrets)."""
        return self.body[:limit].decode("utf-8", "replace").strip()


class _Collector(TwistedProtocol):
    """Reads a response body up to a size cap; cancelling aborts the connection."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._cancel(self.done)
            self.done.errback(EngineUnavailable(f"engine reply larger than {self.limit} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = PotentialDataLoss) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        # An exec stream is delimited by the connection close (PotentialDataLoss).
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class Deadline:
    """One operation's time budget, shared by the engine calls it makes."""

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds
        self.end = clock.seconds() + seconds

    def remaining(self) -> float:
        return self.end - self.clock.seconds()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0


class EngineClient:
    """HaRP's own calls to one engine (unversioned paths, like the reference)."""

    def __init__(self, reactor: Any, agent: Agent, port: int) -> None:
        self.reactor = reactor
        self.agent = agent
        self.port = port

    async def call(
        self,
        method: bytes,
        path: str,
        deadline: Deadline,
        *,
        query: bytes = b"",
        json_body: Any = None,
        data: bytes | None = None,
        content_type: bytes | None = None,
        limit: int = BODY_LIMIT,
    ) -> EngineReply:
        """One request, its whole body read; raises :class:`EngineError` on failure."""
        remaining = deadline.remaining()
        if remaining <= 0:
            raise EngineTimeout(f"Timeout communicating with Docker Engine on port {self.port}")
        headers = Headers()
        producer: IBodyProducer | None = None
        if json_body is not None:
            data = json.dumps(json_body, separators=(",", ":")).encode()
            content_type = b"application/json"
        if data is not None:
            producer = FileBodyProducer(BytesIO(data))
            headers.setRawHeaders(b"content-type", [content_type or b"application/octet-stream"])
        timed_out = False

        def on_timeout(result: Any, timeout: float) -> Any:
            nonlocal timed_out
            timed_out = True
            return result

        exchange = Deferred.fromCoroutine(
            self._exchange(method, engine_uri(self.port, path, query), headers, producer, limit)
        )
        exchange.addTimeout(remaining, self.reactor, onTimeoutCancel=on_timeout)
        try:
            return await exchange
        except EngineError:
            raise
        except CancelledError:
            if timed_out:
                raise EngineTimeout(
                    f"Timeout communicating with Docker Engine on port {self.port}"
                ) from None
            raise
        except Exception as exc:
            if timed_out:
                raise EngineTimeout(
                    f"Timeout communicating with Docker Engine on port {self.port}"
                ) from None
            if isinstance(exc, ResponseFailed | ConnectError) or _is_transport_error(exc):
                log.info("engine on port {port}: {method} {path} failed: {error}",
                         port=self.port, method=method.decode(), path=path, error=_describe(exc))
                raise EngineUnavailable(
                    f"Could not connect to Docker Engine on port {self.port}"
                ) from None
            raise

    async def _exchange(
        self, method: bytes, uri: bytes, headers: Headers, producer: IBodyProducer | None,
        limit: int,
    ) -> EngineReply:
        response: IResponse = await self.agent.request(method, uri, headers, producer)
        collector = _Collector(limit)
        response.deliverBody(collector)
        body = await collector.done
        return EngineReply(response.code, response.headers, body)


def _is_transport_error(exc: Exception) -> bool:
    """Connection-level failures (refused, reset, lost, no engine), not HaRP bugs."""
    from twisted.internet import error as neterr
    from twisted.web._newclient import RequestGenerationFailed, RequestTransmissionFailed

    return isinstance(
        exc,
        neterr.ConnectionLost | neterr.ConnectionDone | neterr.ConnectError
        | RequestGenerationFailed | RequestTransmissionFailed | OSError,
    )


def _describe(exc: Exception) -> str:
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(exc) or type(exc).__name__


def engine_pool(reactor: Any) -> HTTPConnectionPool:
    """A keep-alive pool: wait_for_start polls twice a second over the same engine."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    pool.cachedConnectionTimeout = 10
    return pool
