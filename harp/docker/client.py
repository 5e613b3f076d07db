"""HaRP's own HTTP client for one Docker engine: deadlines, size caps, error statuses.

The ``/docker/exapp/*`` operations (:mod:`harp.docker.lifecycle`) make their Engine calls
through :class:`EngineClient`, a small non-blocking client over a Twisted ``Agent`` whose
endpoint factory is :class:`~harp.docker.engines.EngineEndpoints` — the same one the
passthrough uses, so both reach the same engine for a port.  Every call has a deadline,
bodies are read with a size cap, and transport failures become :class:`EngineUnavailable`
(503) or :class:`EngineTimeout` (504), the statuses of
docs/compatibility.md#docker-lifecycle-endpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Final

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from harp.docker.engines import engine_uri
from harp.logs import HarpLogger

log = HarpLogger("harp.docker")

#: Largest engine reply HaRP reads itself (inspect JSON, exec output); streams are not read.
BODY_LIMIT: Final = 16 << 20


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


def unexpected_status(what: str, status: int) -> EngineUnavailable:
    """An engine answer HaRP has no mapping for: 503, naming the engine's status."""
    return EngineUnavailable(f"{what}: Status {status}")


@dataclass(frozen=True, slots=True)
class EngineReply:
    status: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        """The JSON body, or None when it is not JSON (engines answer JSON as a rule)."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # nested too deep: not JSON
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
