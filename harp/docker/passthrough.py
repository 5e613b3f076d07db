"""The raw Docker Engine API passthrough: the HTTP adapter
(docs/compatibility.md#docker-allow-list).

AppAPI's raw Engine calls arrive on ``/exapps/app_api/<rest>`` with ``docker-engine-port``.
Whether one may pass is decided by the pure allow-list (:mod:`harp.docker.allowlist`,
path and query); which engine serves it, by :mod:`harp.docker.engines`.  This module only
applies those verdicts to a request, in the order that keeps the answers unchanged: a bad
port is 400, a refused path or query 403 (even with no engine connected), and only an
allowed call to a port with no engine 503.  What passes is streamed by the ExApp proxy
with the checked path and the canonical query, without HaRP's secrets.
"""

from __future__ import annotations

from io import BytesIO
from typing import Final, cast

from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer
from twisted.web.server import Request

from harp.docker.allowlist import allowed_request
from harp.docker.engines import (
    ENGINE_HOST,
    PORT_HEADER,
    EngineEndpoints,
    EngineSelectionError,
    refuse_selection,
    requested_port,
)
from harp.web import responses
from harp.web.proxy import ExAppProxy
from harp.web.site import HarpRequest

#: Never sent to an engine: HaRP's shared key (also inside AppAPI's Basic auth) is no
#: business of a remote engine's frpc host.
_SECRET_HEADERS: Final = frozenset({b"harp-shared-key", b"authorization", PORT_HEADER, b"cookie"})


class DockerPassthrough:
    """Serves ``/exapps/app_api/<rest>`` requests that carry ``docker-engine-port``."""

    def __init__(self, endpoints: EngineEndpoints, proxy: ExAppProxy) -> None:
        self.endpoints = endpoints
        self.proxy = proxy

    def passthrough(self, request: Request, rest: bytes) -> None:
        _, _, query = request.uri.partition(b"?")
        try:
            port = requested_port(request)
            allowed = allowed_request(request.method, rest, query)
            if allowed is None:
                # Said in the request's access line (docs/operations.md, "Logs").
                cast(HarpRequest, request).detail = "not in the Docker allow-list: " + _printable(
                    rest + (b"?" + query if query else b"")
                )
                responses.finish(request, responses.error(request, 403))
                return
            self.endpoints.require(port)
        except EngineSelectionError as exc:
            responses.finish(request, refuse_selection(request, exc))
            return
        target, canonical = allowed
        # ExAppProxy.forward takes the query from request.uri: hand it the checked one.
        request.uri = request.uri.partition(b"?")[0] + (b"?" + canonical if canonical else b"")
        # The secrets stay behind when the header lines are written (and those lines are
        # remembered by the header bytes, as on the ExApp route: docs/performance.md).
        self.proxy.forward(
            request, ENGINE_HOST, port, target, [], _body(request),
            headers_as_received=True, also_drop=_SECRET_HEADERS,
        )


def _body(request: Request) -> IBodyProducer | None:
    """The (already collected, ≤ 1 MiB) request body, e.g. an image import's tarball."""
    content = request.content
    data = content.getvalue() if isinstance(content, BytesIO) else b""
    return FileBodyProducer(BytesIO(data)) if data else None


def _printable(raw: bytes) -> str:
    return raw[:200].decode("latin-1").encode("unicode_escape").decode("ascii")
