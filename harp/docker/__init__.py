"""Docker engines behind HaRP: engine selection, the raw Engine API passthrough and the
``/docker/exapp/*`` lifecycle (docs/compatibility.md#docker-engine-api, docs/differences.md#3).

One concern per module: :mod:`~harp.docker.engines` (which engine a port means),
:mod:`~harp.docker.client` (HaRP's own Engine calls), :mod:`~harp.docker.allowlist` and
:mod:`~harp.docker.query` (what the passthrough admits, pure), :mod:`~harp.docker.passthrough`
(its HTTP adapter), :mod:`~harp.docker.names` (AppAPI's payloads, pure),
:mod:`~harp.docker.wire`, :mod:`~harp.docker.certificates` (Engine bodies and certificate
files, pure), :mod:`~harp.docker.archive` (the archive API), :mod:`~harp.docker.lifecycle`
(the operations) and :mod:`~harp.docker.routes` (their HTTP adapter).

:func:`build` wires them over one :class:`~harp.docker.engines.EngineEndpoints`, so the
passthrough and HaRP's own lifecycle calls always reach the same engine for a port.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harp.docker.engines import EngineEndpoints
from harp.docker.lifecycle import DockerLifecycle
from harp.docker.passthrough import DockerPassthrough
from harp.docker.routes import LifecycleRoutes
from harp.web.control import ControlPlane
from harp.web.proxy import ExAppProxy
from harp.web.upstream import TunnelLookup

__all__ = [
    "DockerLifecycle", "DockerPassthrough", "DockerSide", "EngineEndpoints", "LifecycleRoutes",
    "build",
]


@dataclass(frozen=True, slots=True)
class DockerSide:
    """What the wiring needs of the Docker side: the passthrough for ``Root`` and how to
    close its connection pools at shutdown."""

    passthrough: DockerPassthrough
    closers: tuple[Callable[[], object], ...]


def build(
    reactor: Any,
    control: ControlPlane,
    *,
    socket_path: Path,
    tunnels: TunnelLookup | None,
    connect_timeout: float,
    server_timeout: float,
    frp_certs_dir: Path | None,
) -> DockerSide:
    """Register ``/docker/exapp/*`` on ``control``; return the passthrough and pools."""
    endpoints = EngineEndpoints(reactor, socket_path, tunnels, connect_timeout)
    routes = LifecycleRoutes(reactor, endpoints, DockerLifecycle(reactor, frp_certs_dir))
    routes.register(control)
    proxy = ExAppProxy(reactor, connect_timeout, server_timeout, endpoints=endpoints)
    return DockerSide(
        DockerPassthrough(endpoints, proxy),
        (routes.pool.closeCachedConnections, proxy.pool.close_all),
    )
