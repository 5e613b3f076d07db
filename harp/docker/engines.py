"""Which Docker engine a request means, and the endpoint that reaches it.

AppAPI names the engine with the ``docker-engine-port`` header (the daemon's
``docker_socket_port``).  The reference connects to ``127.0.0.1:<that port>`` whatever it is
(reference issue #77).  We map it instead (docs/differences.md#3):

* ``24000`` → the local engine socket ``HP_DOCKER_SOCKET`` when it exists (no frpc hop);
  failing that, an FRP engine tunnel registered on 24000 (the reference's bundled frpc);
* ``24001``-``24099`` → the in-process FRP tunnel registered on that port;
* anything else → 400, and a port with no live engine → 503 naming the port.

So no header value can make HaRP connect to an arbitrary loopback service.

:class:`EngineEndpoints` is the ``IAgentEndpointFactory`` for URIs ``http://engine:<port>/…``:
the passthrough's streaming proxy and :class:`~harp.docker.client.EngineClient` (HaRP's own
lifecycle calls) both use it, so both see the same engine.  Both HTTP adapters read the
header with :func:`requested_port` and answer a refused selection with
:func:`refuse_selection`, so the rules and the JSON answer are written once.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Request
from zope.interface import implementer

from harp.web import responses
from harp.web.headers import last_header
from harp.web.upstream import TunnelLookup

LOCAL_PORT: Final = 24000
REMOTE_PORTS: Final = range(24001, 24100)
#: The URI host of every engine request; the port selects the engine.
ENGINE_HOST: Final = "engine"
#: The request header that names the engine (AppAPI's daemon ``docker_socket_port``).
PORT_HEADER: Final = b"docker-engine-port"
#: Seconds a local engine socket, once found, is believed without asking the file system
#: again.  Every passthrough request asks (``_ping`` is AppAPI's most frequent call), and
#: a ``stat`` per request was a system call of its own (docs/performance.md).  Only a
#: socket that is there is remembered: one that appears is seen at once, one that goes
#: away fails the next connection for at most this long (pooled connections are
#: reused anyway).
SOCKET_RECHECK: Final = 1.0


class EngineSelectionError(Exception):
    """``docker-engine-port`` does not name a usable engine; ``status`` is 400 or 503."""

    def __init__(self, status: int, message: str, port: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.port = port

    def payload(self) -> dict[str, Any]:
        return {"error": self.message, "docker_engine_port": self.port}


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


def requested_port(request: Request) -> int:
    """The engine port ``request``'s ``docker-engine-port`` names, or the selection error."""
    return parse_port(last_header(request, PORT_HEADER))


def refuse_selection(request: Request, error: EngineSelectionError) -> bytes:
    """The JSON answer (400 or 503) to a request whose engine cannot be used."""
    return responses.send_json(request, error.status, error.payload())


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
        self._socket_name = str(socket_path)
        self.tunnels = tunnels
        self.connect_timeout = connect_timeout
        #: Monotonic seconds; a test may stand in its own.
        self.clock: Callable[[], float] = time.monotonic
        self._socket_believed_until = 0.0

    def local_socket(self) -> bool:
        """Is ``HP_DOCKER_SOCKET`` a socket?  A yes is remembered :data:`SOCKET_RECHECK` s."""
        now = self.clock()
        if now < self._socket_believed_until:
            return True
        # os.stat of a string, not Path.stat: asked on every passthrough request.
        try:
            found = stat.S_ISSOCK(os.stat(self._socket_name).st_mode)
        except OSError:
            return False
        if found:
            self._socket_believed_until = now + SOCKET_RECHECK
        return found

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
        """Raise the 503 naming ``port`` when no engine is connected there.

        Asks whether there is one, without building the endpoint (which only a new
        upstream connection needs; most requests reuse a pooled one).
        """
        if port == LOCAL_PORT and self.local_socket():
            return
        if self.tunnels is not None and self.tunnels.endpoint_for(port) is not None:
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
