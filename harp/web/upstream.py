"""How the proxy reaches an upstream: the ``UpstreamEndpoint`` seam.

The proxy asks for ``http://host:port/...``; this factory turns the URI into a client
endpoint.  IP literals connect directly, DNS names (direct-mode ExApps) resolve
through the reactor's non-blocking resolver on every new connection (so an ExApp
container that changed IP is found again, unlike the reference's memoised address),
and — once the FRP server registers tunnels — 127.0.0.1:P with a live tunnel becomes
a tunnel stream without a loopback hop.  Every connect, name resolution included, is
bounded by ``HP_TIMEOUT_CONNECT``.
"""

from __future__ import annotations

import ipaddress
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IStreamClientEndpoint,
)
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


class TunnelLookup(Protocol):
    """What the FRP side offers its users: ``harp.frp.tunnels.TunnelRegistry`` as seen by
    the HTTP proxy here and by the Docker engine endpoints (``harp.docker``).

    Defined once, on the users' side, so that neither imports the FRP server.
    """

    def endpoint_for(self, port: int) -> IStreamClientEndpoint | None: ...


@implementer(IStreamClientEndpoint)
class _BoundedConnect:
    """Wrap an endpoint so that connecting (resolution included) has a deadline."""

    def __init__(self, endpoint: IStreamClientEndpoint, reactor: IReactorCore, timeout: float):
        self._endpoint = endpoint
        self._reactor = reactor
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        d: Deferred[IProtocol] = self._endpoint.connect(protocolFactory)
        return d.addTimeout(self._timeout, self._reactor)  # type: ignore[arg-type]


@implementer(IAgentEndpointFactory)
class EndpointFactory(Protocol):
    """What the proxy needs to reach an upstream: an endpoint for its URI.

    Twisted's ``IAgentEndpointFactory``, as a structural type: the ExApps'
    :class:`UpstreamEndpoints` and the Docker engines' ``EngineEndpoints`` both provide it,
    and a compiled caller (harp/compiled.py) checks the declared type at run time.
    """

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint: ...


class UpstreamEndpoints:
    def __init__(
        self, reactor: IReactorCore, connect_timeout: float, tunnels: TunnelLookup | None = None
    ) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self.tunnels = tunnels

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii").strip("[]")
        port = uri.port
        if self.tunnels is not None and host == "127.0.0.1":
            tunnel = self.tunnels.endpoint_for(port)
            if tunnel is not None:
                return tunnel
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            endpoint: IStreamClientEndpoint = HostnameEndpoint(
                self._reactor, host, port, timeout=self._timeout
            )
        else:
            kind = TCP6ClientEndpoint if literal.version == 6 else TCP4ClientEndpoint
            endpoint = kind(self._reactor, host, port, timeout=self._timeout)
        return _BoundedConnect(endpoint, self._reactor, self._timeout)


def upstream_uri(host: str, port: int, target: bytes, query: bytes) -> bytes:
    """The absolute URI the Agent needs (``target`` ``""`` becomes ``/``)."""
    if ":" in host:
        authority = f"[{host}]".encode("ascii")
    else:
        try:
            authority = host.encode("ascii")
        except UnicodeEncodeError:
            authority = host.encode("idna")
    if target[:1] not in (b"", b"/"):
        # Never reached with a checked target; refuse rather than let bytes of the
        # client's path run into the authority (a "0/..." target once changed the port).
        raise ValueError("upstream target must be origin-form")
    path = target or b"/"
    if query:
        path += b"?" + query
    return b"http://%s:%d%s" % (authority, port, path)
